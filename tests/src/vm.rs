//! A throwaway VM for tests that need a kernel the host does not run (one with IPVS, or the older
//! verifier the XDP program must also pass): Debian's kernel and userland pieces fetched with
//! `apt-get download`, an initramfs built here around a test's `/init` script, and qemu with TCG
//! (no KVM on these hosts). The script reports on a second serial port, which the host reads once
//! the VM has powered off.
//!
//! Everything comes from Debian packages or from this repository (static builds of the agent and
//! of test suites); downloads and unpacked files are cached under `target/vm-cache/`. Any missing
//! piece fails loudly.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use object::{
    Endianness, Object as _, ObjectSection as _,
    elf::{DT_NEEDED, FileHeader64},
    read::elf::{FileHeader as _, ProgramHeader as _},
};

use crate::cpio::Cpio;

/// Where downloads and unpacked packages are kept between runs.
pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm-cache")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian packages fetched with `apt-get download` and unpacked (`dpkg-deb`) into one tree.
pub struct DebianTree {
    pub root: PathBuf,
    debs: PathBuf,
}

impl DebianTree {
    pub fn open() -> anyhow::Result<Self> {
        let dir = cache_dir();
        let tree = Self {
            root: dir.join("root"),
            debs: dir.join("debs"),
        };
        fs::create_dir_all(&tree.root)?;
        fs::create_dir_all(&tree.debs)?;
        Ok(tree)
    }

    /// The concrete package a virtual or meta package resolves to (e.g. linux-image-amd64 ->
    /// linux-image-6.1.0-NN-amd64), through its first `Depends`.
    pub fn resolve(&self, meta: &str, prefix: &str) -> anyhow::Result<String> {
        let run = || output(Command::new("apt-cache").args(["depends", meta]));
        let text = match run() {
            Ok(t) if t.contains(prefix) => t,
            _ => {
                apt_update()?;
                run()?
            }
        };
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| format!("apt-cache depends {meta} names no {prefix}* package"))
    }

    /// The downloaded .deb of `package`, fetching it if needed.
    pub fn deb(&self, package: &str) -> anyhow::Result<PathBuf> {
        if let Some(found) = self.find_deb(package)? {
            return Ok(found);
        }
        let download = || {
            output(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(&self.debs),
            )
        };
        if download().is_err() {
            // A fresh machine may never have fetched the package lists.
            apt_update()?;
            download().with_context(|| format!("apt-get download {package}"))?;
        }
        self.find_deb(package)?
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }

    fn find_deb(&self, package: &str) -> anyhow::Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(fs::read_dir(&self.debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            }))
    }

    /// Unpacks `package` (only the members matching `patterns`, tar wildcards, if any) into the
    /// tree, once.
    pub fn unpack(&self, package: &str, patterns: &[&str]) -> anyhow::Result<()> {
        // The stamp names the patterns too: a cache unpacked with fewer of them (an older
        // harness) is completed instead of trusted.
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(patterns, &mut hasher);
        let stamp = self.root.join(format!(
            ".unpacked-{package}-{:016x}",
            std::hash::Hasher::finish(&hasher)
        ));
        if stamp.exists() {
            return Ok(());
        }
        let deb = self.deb(package)?;
        let mut dpkg = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(&deb)
            .stdout(Stdio::piped())
            .spawn()
            .context("start dpkg-deb")?;
        let mut tar = Command::new("tar");
        tar.arg("-x")
            .arg("-C")
            .arg(&self.root)
            .stdin(dpkg.stdout.take().unwrap());
        if !patterns.is_empty() {
            tar.arg("--wildcards").args(patterns);
        }
        let status = tar.status().context("start tar")?;
        let dpkg_status = dpkg.wait()?;
        if !status.success() || !dpkg_status.success() {
            bail!(
                "unpacking {} failed (dpkg-deb {dpkg_status}, tar {status})",
                deb.display()
            );
        }
        fs::write(stamp, "")?;
        Ok(())
    }

    /// A path inside the tree (`/lib/...`).
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

fn apt_update() -> anyhow::Result<()> {
    output(Command::new("apt-get").args(["update", "-qq"])).map(drop)
}

/// The kernel image and its modules, from Debian's linux-image-amd64.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

impl Kernel {
    pub fn fetch(tree: &DebianTree) -> anyhow::Result<Self> {
        let package = tree.resolve("linux-image-amd64", "linux-image-")?;
        // Only what the VM tests load: the image, a few module folders for netfilter/IPVS and
        // the dummy and veth drivers (the whole package unpacks to ~400 MB).
        tree.unpack(
            &package,
            &[
                "./boot/vmlinuz-*",
                "./lib/modules/*/kernel/net/*",
                "./lib/modules/*/kernel/lib/*",
                "./lib/modules/*/kernel/crypto/*",
                "./lib/modules/*/kernel/drivers/net/dummy.ko",
                "./lib/modules/*/kernel/drivers/net/veth.ko",
            ],
        )?;
        let version = package
            .strip_prefix("linux-image-")
            .context("kernel package name")?;
        let vmlinuz = tree.path(&format!("/boot/vmlinuz-{version}"));
        let modules_dir = tree.path(&format!("/lib/modules/{version}"));
        if !vmlinuz.is_file() || !modules_dir.is_dir() {
            bail!(
                "{package} did not provide {} and {}",
                vmlinuz.display(),
                modules_dir.display()
            );
        }
        Ok(Self {
            vmlinuz,
            modules_dir,
        })
    }

    /// Every module file by module name (`crc32c-intel.ko` is `crc32c_intel`).
    fn module_index(&self) -> anyhow::Result<HashMap<String, PathBuf>> {
        let mut index = HashMap::new();
        let mut stack = vec![self.modules_dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "ko") {
                    let name = path
                        .file_stem()
                        .unwrap()
                        .to_string_lossy()
                        .replace('-', "_");
                    index.insert(name, path);
                }
            }
        }
        Ok(index)
    }

    /// `roots` and everything they depend on (the `depends=` of each module's .modinfo; the
    /// package carries no modules.dep, depmod makes it at install), in an order insmod can load
    /// them: dependencies first, then the roots in the order given. Soft dependencies (such as
    /// libcrc32c needing a crc32c implementation) are not in `depends=`: list them as roots.
    pub fn load_order(&self, roots: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        let index = self.module_index()?;
        let mut order = Vec::new();
        let mut seen = BTreeMap::new();
        for root in roots {
            visit(root, &index, &mut seen, &mut order)?;
        }
        Ok(order)
    }
}

fn visit(
    name: &str,
    index: &HashMap<String, PathBuf>,
    seen: &mut BTreeMap<String, bool>,
    order: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    match seen.get(name) {
        Some(true) => return Ok(()),
        Some(false) => bail!("module dependency cycle through {name}"),
        None => {}
    }
    seen.insert(name.to_owned(), false);
    let path = index
        .get(name)
        .with_context(|| format!("the kernel package has no module {name}"))?;
    for dep in module_depends(path)? {
        visit(&dep, index, seen, order)?;
    }
    seen.insert(name.to_owned(), true);
    order.push(path.clone());
    Ok(())
}

/// The `depends=` list of a kernel module.
pub fn module_depends(path: &Path) -> anyhow::Result<Vec<String>> {
    let data = fs::read(path)?;
    let file = object::File::parse(&*data).with_context(|| format!("parse {}", path.display()))?;
    let modinfo = file
        .section_by_name(".modinfo")
        .with_context(|| format!("{} has no .modinfo", path.display()))?
        .data()?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect())
}

/// What a dynamically linked executable needs: its ELF interpreter and DT_NEEDED libraries.
fn elf_needs(data: &[u8]) -> anyhow::Result<(Option<String>, Vec<String>)> {
    let header = FileHeader64::<Endianness>::parse(data)?;
    let endian = header.endian()?;
    let mut interpreter = None;
    for ph in header.program_headers(endian, data)? {
        if let Some(i) = ph.interpreter(endian, data)? {
            interpreter = Some(String::from_utf8_lossy(i).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let table = sections.dynamic_table(endian, data)?;
    let mut needed = Vec::new();
    for d in table.iter() {
        if d.tag == DT_NEEDED {
            needed.push(String::from_utf8_lossy(table.string(d)?).into_owned());
        }
    }
    Ok((interpreter, needed))
}

/// Library folders of an unpacked Debian amd64 tree.
const LIB_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"];
/// Where the initramfs puts every library (the script sets LD_LIBRARY_PATH to it).
pub const INITRAMFS_LIB_DIR: &str = "/lib/x86_64-linux-gnu";

/// An initramfs being assembled.
pub struct Initramfs {
    cpio: Cpio,
    dirs: std::collections::BTreeSet<String>,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Initramfs {
    pub fn new() -> Self {
        Self {
            cpio: Cpio::new(),
            dirs: Default::default(),
        }
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len() - 1] {
            prefix.push('/');
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.cpio.dir(&prefix);
            }
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(&format!("{path}/x"));
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) {
        self.parents(path);
        self.cpio.file(path, mode, contents);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.cpio.symlink(path, target);
    }

    /// Copies a file from the host (following symlinks).
    pub fn copy(&mut self, path: &str, mode: u32, from: &Path) -> anyhow::Result<()> {
        let data = fs::read(from).with_context(|| format!("read {}", from.display()))?;
        self.file(path, mode, &data);
        Ok(())
    }

    /// Copies a dynamically linked executable from `tree` with its interpreter and every library
    /// it needs, transitively.
    pub fn executable_from(&mut self, tree: &DebianTree, inside: &str) -> anyhow::Result<()> {
        let data = fs::read(tree.path(inside))
            .with_context(|| format!("{inside} is not in the unpacked packages"))?;
        let (interpreter, mut pending) = elf_needs(&data)?;
        self.file(inside, 0o755, &data);
        if let Some(interp) = interpreter {
            let name = Path::new(&interp).file_name().unwrap().to_string_lossy();
            let host = find_lib(tree, &name)?;
            self.copy(&interp, 0o755, &host)?;
        }
        let mut done = std::collections::BTreeSet::new();
        while let Some(lib) = pending.pop() {
            if !done.insert(lib.clone()) {
                continue;
            }
            let host = find_lib(tree, &lib)?;
            let data = fs::read(&host)?;
            pending.extend(elf_needs(&data)?.1);
            self.file(&format!("{INITRAMFS_LIB_DIR}/{lib}"), 0o755, &data);
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.cpio.finish()
    }
}

/// What every VM test's initramfs holds: busybox at /bin/busybox, the statically linked agent
/// at /lb-agent, the Debian `packages` unpacked into `tree` with `executables` taken from them
/// (each with its libraries), and the kernel `modules` with their dependencies under /modules.
/// Returns the archive, for the test to add its own files and /init, and the module file names
/// in load order, for the init script to insmod.
pub fn base_initramfs(
    kernel: &Kernel,
    tree: &DebianTree,
    packages: &[&str],
    executables: &[&str],
    modules: &[&str],
) -> anyhow::Result<(Initramfs, Vec<String>)> {
    for package in std::iter::once(&"busybox-static").chain(packages) {
        tree.unpack(package, &[])
            .with_context(|| format!("Debian package {package}"))?;
    }
    let mut fs = Initramfs::new();
    fs.copy("/bin/busybox", 0o755, &tree.path("/bin/busybox"))?;
    for exe in executables {
        fs.executable_from(tree, exe)?;
    }
    fs.file("/lb-agent", 0o755, &static_agent()?);
    let mut names = Vec::new();
    for path in kernel.load_order(modules)? {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        fs.copy(&format!("/modules/{name}"), 0o644, &path)?;
        names.push(name);
    }
    Ok((fs, names))
}

fn find_lib(tree: &DebianTree, name: &str) -> anyhow::Result<PathBuf> {
    LIB_DIRS
        .iter()
        .map(|d| tree.path(&format!("{d}/{name}")))
        .find(|p| p.exists())
        .with_context(|| {
            format!("library {name} is in none of {LIB_DIRS:?} of the unpacked packages")
        })
}

/// What a VM run left behind.
pub struct VmRun {
    /// The kernel console (first serial port).
    pub console: String,
    /// What the script wrote to the second serial port.
    pub report: String,
    pub elapsed: Duration,
}

/// Boots `kernel` with `initramfs` under qemu (TCG), waits for it to power off (or `timeout`),
/// and returns both serial ports' output.
pub fn boot(
    kernel: &Kernel,
    initramfs: &[u8],
    memory_mb: u32,
    timeout: Duration,
    work: &Path,
) -> anyhow::Result<VmRun> {
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!(
            "{qemu} is not installed: install Debian's qemu-system-x86 (`cargo xtask setup` does)"
        );
    }
    fs::create_dir_all(work)?;
    let initrd = work.join("initramfs.cpio");
    fs::write(&initrd, initramfs)?;
    let console = work.join("console.log");
    let report = work.join("report.log");
    for f in [&console, &report] {
        let _ = fs::remove_file(f);
    }
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-nodefaults"])
        .args(["-m", &memory_mb.to_string()])
        .args(["-display", "none", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        // panic=-1: a failing /init reboots at once, which -no-reboot turns into an exit.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start qemu")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(&initrd);
            bail!(
                "the VM did not power off within {timeout:?}; console:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    // The logs stay for a failed test to be read; the (large) initramfs is rebuilt every run.
    let _ = fs::remove_file(&initrd);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr)?;
    let console = fs::read_to_string(&console).unwrap_or_default();
    if !status.success() {
        bail!("qemu exited with {status}: {stderr}\nconsole:\n{console}");
    }
    Ok(VmRun {
        console,
        report: fs::read_to_string(&report).unwrap_or_default(),
        elapsed,
    })
}

/// A statically linked (musl) binary of this workspace for the VM: the path in `env_var` (which
/// `cargo xtask test` sets), else the musl debug build of `name`, without its debug info (see
/// [`stripped`]). Fails loudly, naming the build command, when it is missing.
pub fn static_binary(env_var: &str, package: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-musl/debug")
                .join(name)
        });
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p {package} --bin {name} --target \
             x86_64-unknown-linux-musl` (`cargo xtask test` does, and sets {env_var})",
            path.display()
        );
    }
    stripped(&path)
}

/// An executable without its debug info: debug builds are 150-200 MB, most of it DWARF, and the
/// initramfs unpacks into the VM's memory.
pub fn stripped(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.file_name().context("a file path")?.to_string_lossy();
    let out = cache_dir().join(format!("{name}-{}.stripped", std::process::id()));
    fs::create_dir_all(cache_dir())?;
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(path),
    )
    .context("strip (Debian's binutils) removes the debug info")?;
    let data = fs::read(&out);
    let _ = fs::remove_file(&out);
    Ok(data?)
}

/// The statically linked agent (`XLB_AGENT_STATIC_BIN`).
pub fn static_agent() -> anyhow::Result<Vec<u8>> {
    static_binary("XLB_AGENT_STATIC_BIN", "lb-agent", "lb-agent")
}

/// A VM report's sections by name: (body, exit code of the command). A script writes them with
/// `=== BEGIN name`, the command's output, `=== END name rc=N` (see the `section` shell function
/// of the VM tests).
pub fn sections(report: &str) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(name) = line.strip_prefix("=== BEGIN ") {
            current = Some((name.to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("=== END ") {
            let (name, body) = current.take().expect("END without BEGIN");
            let rc = rest.rsplit("rc=").next().unwrap_or_default().to_owned();
            assert!(rest.starts_with(&name), "END {rest} closes BEGIN {name}");
            out.insert(name, (body, rc));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_needs_reads_interpreter_and_needed_libraries_of_a_host_binary() {
        // The test binary itself is a dynamically linked glibc executable.
        let exe = std::env::current_exe().unwrap();
        let (interp, needed) = elf_needs(&fs::read(exe).unwrap()).unwrap();
        assert!(interp.unwrap().contains("ld-linux"));
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
    }
}
