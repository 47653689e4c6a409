//! Port pools over `client_ports` and `server_ports`.

use crate::config::PortRange;

/// A pool of gateway ports. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct PortPool {}

/// A port taken from a pool; returned when dropped.
#[derive(Debug)]
pub struct PortLease {}

impl PortPool {
    /// A pool over `range`; `name` is used in errors ("client", "server").
    pub fn new(name: &'static str, range: PortRange) -> Self {
        let _ = (name, range);
        unimplemented!()
    }
}
