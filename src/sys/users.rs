//! Users and groups by name, read from `/etc/passwd` and `/etc/group`.
//!
//! The binary is statically linked against glibc, whose `getpwnam`/`getgrnam`
//! would load NSS modules at run time; these files are what agentlab's hosts
//! and guests use, so reading them directly is both safe and enough.

/// The numeric id in field 3 of the line whose first field is `name`.
fn id_in(db: &str, name: &str) -> Option<u32> {
    db.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

pub fn group_gid(name: &str) -> Option<u32> {
    id_in(&std::fs::read_to_string("/etc/group").ok()?, name)
}

pub fn user_uid(name: &str) -> Option<u32> {
    id_in(&std::fs::read_to_string("/etc/passwd").ok()?, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_id_of_a_named_entry() {
        let db = "root:x:0:\nagentlab:x:997:alice,bob\n";
        assert_eq!(id_in(db, "agentlab"), Some(997));
    }

    #[test]
    fn a_prefix_is_not_a_match() {
        assert_eq!(id_in("agentlabx:x:5:\n", "agentlab"), None);
    }

    #[test]
    fn root_exists_on_this_host() {
        assert_eq!(user_uid("root"), Some(0));
    }
}
