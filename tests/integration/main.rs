mod agent;
mod util;
