//! Link order for release builds: `packaging/link-order.txt` (written by
//! `bench/orderfile.sh`) lists the functions an idle worker, the supervisor
//! and a pipeline run execute, in first-run order; rust-lld places them first
//! and together (`--symbol-ordering-file`, ld.lld(1)). The kernel maps code
//! into a process in blocks of 64 KiB or more, so this is what keeps an idle
//! worker's resident code near the size of the code it runs (BENCHMARKS.md,
//! "Idle memory").
//!
//! Only where rust-lld is the linker: the `x86_64-unknown-linux-gnu` target
//! (rustc 1.90 and later link with it by default), and not when
//! `HYDRAFLOW_NO_LINK_ORDER` is set (for another linker). Names the file lists
//! that a build no longer has are skipped silently, so a stale file costs
//! memory, never a failed build.

fn main() {
    let order = "packaging/link-order.txt";
    println!("cargo:rerun-if-changed={order}");
    println!("cargo:rerun-if-env-changed=HYDRAFLOW_NO_LINK_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu"
        || profile != "release"
        || std::env::var_os("HYDRAFLOW_NO_LINK_ORDER").is_some()
        || !std::path::Path::new(order).exists()
    {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={dir}/{order}");
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}
