//! Kernel plumbing, with no FTP in it: the netfilter netlink socket and the
//! conntrack messages read from it ([`ctnetlink`]), the conntrack table's
//! events and requests ([`conntrack`]), nf_tables
//! element batches ([`nftnl`]), the gateway's own table and its lifecycle
//! ([`table`], whose elements are [`element`]), and the ruleset text that
//! `ftpgate nft` prints ([`ruleset`]).
//!
//! Imports go one way: `table` → `nftnl` → `ctnetlink` ← `conntrack`,
//! `table`, `nftnl` → `element`; `ruleset` → `table`.

pub(crate) mod conntrack;
pub mod ctnetlink;
pub(crate) mod element;
#[cfg(test)]
pub(crate) mod netns;
pub(crate) mod nftnl;
mod ruleset;
pub(crate) mod table;

pub use element::Element;
pub use ruleset::{operator_rules, ruleset, Family, OperatorChains, DEFAULT_CONTROL_PORTS};
pub use table::InterceptTable;
