//! The supervisor dashboard.
