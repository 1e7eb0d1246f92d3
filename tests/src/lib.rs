//! xlb's test harness, shared by the test suites under `tests/` and the demo binary:
//! network namespaces ([`netns`]), the agent as a process ([`agent`]), packet tests through
//! BPF_PROG_TEST_RUN ([`packet`]), and the end-to-end [`topology`] with real [`traffic`]; and
//! the benchmarks of `cargo xtask bench` ([`bench`]), built on the same pieces.

pub mod agent;
pub mod bench;
pub mod netns;
pub mod packet;
pub mod topology;
pub mod traffic;
