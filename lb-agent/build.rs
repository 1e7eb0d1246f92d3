//! Embeds the eBPF object built by `cargo xtask build-ebpf` for the same profile as this crate.
//! Building the agent without it fails with the command that builds it.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=XLB_EBPF_OBJECT");
    let object = match env::var_os("XLB_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let profile = env::var("PROFILE").unwrap();
            let ebpf_profile = if profile == "release" {
                "release"
            } else {
                "debug"
            };
            manifest_dir
                .join("../target/ebpf/bpfel-unknown-none")
                .join(ebpf_profile)
                .join("lb-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf{}` first \
             (or set XLB_EBPF_OBJECT to a built lb-ebpf object)",
            object.display(),
            if env::var("PROFILE").as_deref() == Ok("release") {
                " --release"
            } else {
                ""
            },
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("lb-ebpf.o");
    std::fs::copy(&object, &out).expect("copy eBPF object into OUT_DIR");
}
