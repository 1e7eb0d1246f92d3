//! `cargo xtask bench` at a tiny scale (a thousand runs per call, ten services, a second of
//! traffic), so the benchmark code cannot rot: every stage must run and produce sane, non-zero
//! numbers and a well-formed report. Nothing here judges speed.

use std::sync::Arc;

use xlb_tests::{
    bench::{self, Params, Stage, report},
    netns::require_privileges,
};

fn sane(what: &str, x: f64) {
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
}

#[test]
fn every_bench_stage_produces_sane_numbers_and_a_report() {
    require_privileges();
    let params = Params::smoke();
    let results = bench::run(
        &params,
        &Stage::ALL,
        "smoke test",
        Arc::new(|what: &str| eprintln!("bench: {what}")),
    );
    assert!(results.failures.is_empty(), "{:?}", results.failures);

    let pp = results.per_packet.as_ref().unwrap();
    assert_eq!(pp.scales.len(), params.per_packet.scales.len());
    for s in &pp.scales {
        assert_eq!(s.services, s.requested, "{:?}", s.shortfall);
        for (what, x) in [
            ("floor", s.floor),
            ("non-service", s.non_service),
            ("established", s.established),
            ("established, no route", s.established_no_route),
            ("reply", s.reply),
            ("new flow", s.new_flow),
            ("established, one call each", s.established_single),
        ] {
            sane(what, x);
        }
    }

    let cp = results.control_plane.as_ref().unwrap();
    assert_eq!(cp.frontends, params.control_plane.services);
    for (what, d) in [
        ("full sync", cp.full_sync),
        ("one change", cp.change),
        ("one change with flows", cp.change_with_flows),
        ("agent start", cp.agent.start_to_synced),
        ("file change", cp.agent.file_change_to_synced),
    ] {
        sane(what, d.as_secs_f64());
    }
    assert_eq!(cp.iptables.len(), 2, "both iptables back ends");
    for t in &cp.iptables {
        assert!(t.full.finished(), "{t:?}");
        sane("iptables-restore", t.full.time().as_secs_f64());
        let change = t.change.expect("a change was restored");
        sane("iptables-restore change", change.time().as_secs_f64());
    }
    sane("agent RSS", cp.agent.peak_rss_kib as f64);
    assert_eq!(
        cp.agent.attached_program, "xlb_xdp",
        "the agent attaches the load balancer, never the bench's floor program"
    );

    let tp = results.throughput.as_ref().unwrap();
    assert_eq!(tp.scales.len(), params.throughput.scales.len());
    for s in &tp.scales {
        for (setup, r) in [
            ("xlb", &s.xlb),
            ("xlb generic", &s.xlb_generic),
            ("iptables", &s.iptables),
        ] {
            sane(&format!("{setup} TCP/s"), r.tcp.per_second());
            sane(&format!("{setup} UDP/s"), r.udp.per_second());
            sane(&format!("{setup} flood"), r.flood_delivered_per_second());
        }
    }

    let markdown = results.markdown();
    for heading in [
        "# xlb benchmarks",
        "## Machine",
        "## Targets",
        "## 1. Per-packet cost",
        "## 2. Control plane",
        "## 3. Throughput",
    ] {
        assert_eq!(
            markdown.matches(heading).count(),
            1,
            "{heading}:\n{markdown}"
        );
    }
    // Every table row has as many cells as its header.
    let mut columns = None;
    for line in markdown.lines() {
        if !line.starts_with('|') {
            columns = None;
            continue;
        }
        let cells = line.matches('|').count();
        assert_eq!(
            *columns.get_or_insert(cells),
            cells,
            "ragged table row: {line}"
        );
    }
    assert!(
        !markdown.contains("NaN") && !markdown.contains(" inf"),
        "{markdown}"
    );
    assert!(!results.verdicts().is_empty());
    let summary = results.readme_summary();
    assert!(summary.starts_with(report::README_BEGIN) && summary.ends_with(report::README_END));
}
