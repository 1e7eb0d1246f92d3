//! xlb's test harness, shared by the test suites under `tests/` and the demo binary:
//! network namespaces ([`netns`]), the agent as a process ([`agent`]), packet tests through
//! BPF_PROG_TEST_RUN ([`packet`]), and a qemu VM with a Debian kernel for what the host kernel
//! lacks ([`vm`], with its initramfs written by [`cpio`]).

pub mod agent;
pub mod cpio;
pub mod netns;
pub mod packet;
pub mod vm;
