mod supervisor;
mod util;
