//! xlb's test harness, shared by the test suites under `tests/` and the demo binary:
//! network namespaces ([`netns`]), the agent as a process ([`agent`]), a fake Kubernetes API
//! server ([`fake_apiserver`]) with [`k8s_objects`] to feed it, the agent's [`pinned`] maps as the
//! program reads them, packet tests through BPF_PROG_TEST_RUN ([`packet`]), the end-to-end
//! [`topology`] with real [`traffic`], a qemu VM with a Debian kernel for what the host kernel
//! lacks ([`vm`], with its initramfs written by [`cpio`]), [`http`] to scrape the agent's
//! listener, [`ops`] for the operator commands, and the benchmarks of `cargo xtask bench`
//! ([`bench`]), built on the same pieces.

pub mod agent;
pub mod bench;
pub mod cpio;
pub mod fake_apiserver;
pub mod http;
pub mod k8s_objects;
pub mod netns;
pub mod ops;
pub mod packet;
pub mod pinned;
pub mod topology;
pub mod traffic;
pub mod vm;
