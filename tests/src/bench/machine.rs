//! What the numbers were measured on: CPU model, cores, kernel, memory, and how busy the machine
//! was. Read from /proc and uname, so the report describes the machine it ran on.

use std::fs;

/// A description of the machine, for the report.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub hypervisor: Option<String>,
    /// 1-minute load average when the bench started.
    pub load_average: String,
}

fn meminfo_kib(field: &str) -> Option<u64> {
    fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `MemAvailable` in bytes: what can still be allocated without swapping.
pub fn mem_available_bytes() -> u64 {
    meminfo_kib("MemAvailable").unwrap_or(0) * 1024
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let hypervisor = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .filter(|l| l.split_whitespace().any(|f| f == "hypervisor"))
            .map(|_| {
                fs::read_to_string("/sys/hypervisor/type")
                    .map(|t| t.trim().to_owned())
                    .unwrap_or_else(|_| "a hypervisor (virtual machine)".into())
            });
        let uname = uname();
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: uname,
            memory_gib: meminfo_kib("MemTotal").unwrap_or(0) as f64 / (1024.0 * 1024.0),
            hypervisor,
            load_average: fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
                .unwrap_or_default(),
        }
    }
}

/// `uname -srm`.
fn uname() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!(
        "{} {} {}",
        field(&u.sysname),
        field(&u.release),
        field(&u.machine)
    )
}
