//! The `inet agentlab` nftables table: rendered from a typed plan, applied atomically.
