//! Bridge and TAP devices for sandboxes, through netlink and ioctls in `sys`.
