//! Links libpcap, whose compiler turns capture filters into BPF (src/capture/filter/bpf.rs).
//!
//! A normal build links the shared library. The image's build (glibc with crt-static, see
//! deploy/build-image.sh) links Debian's libpcap.a, whose pcap.o references its D-Bus capture
//! module and so needs libdbus-1.a, which in turn calls two functions of libsystemd, of which
//! Debian ships no static archive. The switch never opens a live capture, let alone a D-Bus one,
//! so those two are provided by src/capture/filter/sd_stubs.c with the answers of a process that
//! systemd did not socket-activate.

use std::path::Path;
use std::process::Command;

/// Where the C compiler finds `file` (gcc and clang print the bare name when they do not).
fn find(file: &str) -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc)
        .arg(format!("-print-file-name={file}"))
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
    Path::new(&p).is_absolute().then_some(p)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/capture/filter/sd_stubs.c");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let is_static = features.split(',').any(|f| f == "crt-static");
    let need = if is_static {
        ["libpcap.a", "libdbus-1.a"].as_slice()
    } else {
        ["libpcap.so"].as_slice()
    };
    for lib in need {
        if find(lib).is_none() {
            panic!(
                "{lib} not found: capture filters are compiled by libpcap; install the Debian \
                 packages libpcap-dev{} (tests/run.sh does)",
                if is_static { " and libdbus-1-dev" } else { "" }
            );
        }
    }
    if !is_static {
        println!("cargo:rustc-link-lib=pcap");
        return;
    }
    // In this order: each archive's undefined symbols are resolved by the ones after it.
    println!("cargo:rustc-link-lib=static:-bundle=pcap");
    println!("cargo:rustc-link-lib=static:-bundle=dbus-1");
    cc::Build::new()
        .file("src/capture/filter/sd_stubs.c")
        .cargo_metadata(false)
        .compile("vswitch_sd_stubs");
    let out = std::env::var("OUT_DIR").unwrap_or_default();
    println!("cargo:rustc-link-search=native={out}");
    println!("cargo:rustc-link-lib=static:-bundle=vswitch_sd_stubs");
}
