//! DHCPv4 server for the sandbox bridge: a pure packet codec plus the lease
//! logic (RFC 2131, options per RFC 2132), and the socket driver.
