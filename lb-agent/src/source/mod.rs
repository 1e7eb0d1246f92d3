//! Sources turn the outside world into [`SourceEvent`]s carrying a complete desired state.
//! Nothing downstream knows which source produced it.

pub mod file;
pub mod kubernetes;

/// A new desired state from a source.
#[derive(Debug)]
pub enum SourceEvent {
    /// The services file was (re-)read.
    File(file::Parsed),
    /// The cluster changed (Services, EndpointSlices or this node).
    Kubernetes(kubernetes::Snapshot),
}
