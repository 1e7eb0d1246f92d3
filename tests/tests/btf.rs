//! The object the agent embeds carries BTF, and every map is a BTF-defined map, so
//! `bpftool map dump` shows field names.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

#[test]
fn the_object_has_btf_and_every_map_is_btf_defined() {
    let data = lb_agent::dataplane::xdp::EMBEDDED_OBJECT;
    let elf = object::File::parse(data).expect("lb-ebpf is an ELF object");
    assert!(
        elf.section_by_name(".BTF").is_some_and(|s| s.size() > 0),
        "no .BTF section: built without -C link-arg=--btf?"
    );
    assert!(
        elf.section_by_name("maps").is_none(),
        "legacy (non-BTF) `maps` section present"
    );
    let maps_section = elf
        .section_by_name(".maps")
        .expect("a .maps section (BTF-defined maps)")
        .index();
    let mut btf_maps: Vec<String> = elf
        .symbols()
        .filter(|s| s.section_index() == Some(maps_section))
        .map(|s| s.name().unwrap().to_owned())
        .collect();
    btf_maps.sort();
    let mut expected: Vec<String> = lb_common::maps::ALL.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        btf_maps, expected,
        "every map named in lb-common is a BTF map, and no other map exists"
    );
}

/// bpftool resolves the map value types through the object's BTF, with field names.
#[test]
fn bpftool_reads_the_map_layouts_from_btf() {
    let dir = std::env::temp_dir().join(format!("xlb-btf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb-ebpf.o");
    std::fs::write(&path, lb_agent::dataplane::xdp::EMBEDDED_OBJECT).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .output()
        .expect("bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    for (ty, field) in [
        ("ServiceKey", "'port'"),
        ("ServiceValue", "'backend_count'"),
        ("BackendValue", "'weight'"),
        ("FlowKey", "'src_addr'"),
        ("FlowValue", "'nat_addr'"),
        ("ServiceStats", "'new_flows'"),
        ("SchedTable", "'backend_ids'"),
        ("Config", "'layout_version'"),
    ] {
        let start = dump
            .find(&format!("STRUCT '{ty}'"))
            .unwrap_or_else(|| panic!("no BTF type {ty}"));
        let body: String = dump[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('\t'))
            .collect();
        assert!(
            body.contains(field),
            "{ty} has no field {field} in BTF: {body}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A panic path in eBPF becomes a function the verifier rejects ("last insn is not an exit or
/// jmp"): every object xtask built (debug, and release when present) must be free of them.
#[test]
fn no_object_contains_panic_paths() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none");
    let mut checked = 0;
    for profile in ["debug", "release"] {
        let Ok(data) = std::fs::read(root.join(profile).join("lb-ebpf")) else {
            continue;
        };
        let elf = object::File::parse(&*data).unwrap();
        let panics: Vec<String> = elf
            .symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .filter(|n| n.contains("panicking") || n.contains("panic_"))
            .collect();
        assert!(
            panics.is_empty(),
            "{profile} object has panic paths: {panics:?}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no eBPF object found under {}", root.display());
}
