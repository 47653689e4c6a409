//! The gateway's nftables table.
