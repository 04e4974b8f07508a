//! The pipeline: issue store, label state machine, stage loops and orchestrator.
