//! xlb's test harness, shared by the test suites under `tests/` and the demo binary:
//! network namespaces ([`netns`]), the agent as a process ([`agent`]) and packet tests through
//! BPF_PROG_TEST_RUN ([`packet`]).

pub mod agent;
pub mod netns;
pub mod packet;
