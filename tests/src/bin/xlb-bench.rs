//! `cargo xtask bench`: runs every benchmark stage (tests/src/bench), prints the report, writes
//! it to `--out` (docs/benchmarks.md) and its summary into the README between the markers.
//! Everything it creates (namespaces, pins, agents) is removed on exit, also on Ctrl-C.
//! Exits non-zero if a stage failed (the report still says which and why).

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use xlb_tests::{
    bench::{self, Params, report},
    netns::{remove_leftovers, require_privileges},
};

struct Args {
    smoke: bool,
    /// Run only these stages (per-packet, control-plane, throughput).
    only: Vec<String>,
    out: Option<PathBuf>,
    readme: Option<PathBuf>,
    command: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        smoke: false,
        only: vec![],
        out: None,
        readme: None,
        command: "xlb-bench".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => args.smoke = true,
            "--only" => args.only.extend(
                it.next()
                    .context("--only needs a stage")?
                    .split(',')
                    .map(str::to_owned),
            ),
            "--out" => args.out = Some(it.next().context("--out needs a path")?.into()),
            "--readme" => args.readme = Some(it.next().context("--readme needs a path")?.into()),
            "--command" => args.command = it.next().context("--command needs a value")?,
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: xlb-bench [--smoke] [--only STAGE,..] \
                 [--out FILE] [--readme README.md] [--command TEXT]"
            ),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    require_privileges();
    ctrlc::set_handler(|| {
        eprintln!("\nbench: interrupted, removing namespaces and pins");
        remove_leftovers();
        std::process::exit(130);
    })?;
    let params = if args.smoke {
        Params::smoke()
    } else {
        Params::full()
    };
    let progress: bench::Progress = Arc::new(|what: &str| eprintln!("bench: {what}"));
    let stages = if args.only.is_empty() {
        bench::Stage::ALL.to_vec()
    } else {
        args.only
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<bench::Stage>, _>>()?
    };
    let results = bench::run(&params, &stages, &args.command, progress);
    let markdown = results.markdown();
    println!("{markdown}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, &markdown).with_context(|| format!("write {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    if let Some(readme) = &args.readme {
        let text = std::fs::read_to_string(readme)?;
        std::fs::write(
            readme,
            report::splice_readme(&text, &results.readme_summary()),
        )?;
        eprintln!("bench: summary written to {}", readme.display());
    }
    if !results.failures.is_empty() {
        anyhow::bail!(
            "{} stage(s) failed: {:?}",
            results.failures.len(),
            results.failures
        );
    }
    Ok(())
}
