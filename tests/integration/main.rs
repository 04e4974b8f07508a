mod systemd_container;
mod systemd_fake;
mod util;
mod util_container;
