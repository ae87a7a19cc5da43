//! DNS on the sandbox gateway: codec, forwarder, per-sandbox policy.
