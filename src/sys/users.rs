//! Users and groups by name, read from `/etc/passwd` and `/etc/group`.
//!
//! The binary is statically linked against glibc, whose `getpwnam`/`getgrnam`
//! would load NSS modules at run time; these files are what agentlab's hosts
//! and guests use, so reading them directly is both safe and enough.
//! Formats: passwd(5) and group(5), one colon-separated entry a line.

/// One passwd(5) entry: the fields a process needs to run as this user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

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

/// `name:passwd:uid:gid:gecos:home:shell`.
fn parse_passwd_line(line: &str) -> Option<Passwd> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() {
        return None;
    }
    Some(Passwd {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
        shell: f[6].to_string(),
    })
}

/// The entry for `who`: a user name, or else a numeric uid.
pub fn find_user_in(db: &str, who: &str) -> Option<Passwd> {
    let entries = || db.lines().filter_map(parse_passwd_line);
    entries().find(|p| p.name == who).or_else(|| {
        let uid: u32 = who.parse().ok()?;
        entries().find(|p| p.uid == uid)
    })
}

/// `find_user_in` over this system's `/etc/passwd`.
pub fn find_user(who: &str) -> Option<Passwd> {
    find_user_in(&std::fs::read_to_string("/etc/passwd").ok()?, who)
}

/// The groups `user` belongs to: `primary` first, then every group(5) entry
/// that lists the user among its members, as `initgroups(3)` would.
pub fn groups_of_in(db: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in db.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(gid), Some(members)) = (f.get(2).and_then(|g| g.parse().ok()), f.get(3)) else {
            continue;
        };
        if members.split(',').any(|m| m.trim() == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// `groups_of_in` over this system's `/etc/group` (just `primary` without one).
pub fn groups_of(user: &str, primary: u32) -> Vec<u32> {
    let db = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups_of_in(&db, user, primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment line\n\
                          alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n\
                          broken:x:notanumber:1::/:/bin/sh\n";

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

    #[test]
    fn user_is_found_by_name() {
        let alice = find_user_in(PASSWD, "alice").unwrap();
        assert_eq!(
            alice,
            Passwd {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/bash".into()
            }
        );
    }

    #[test]
    fn user_is_found_by_numeric_uid() {
        assert_eq!(find_user_in(PASSWD, "1000").unwrap().name, "alice");
    }

    #[test]
    fn unknown_user_and_broken_lines_are_none() {
        assert_eq!(find_user_in(PASSWD, "bob"), None);
        assert_eq!(find_user_in(PASSWD, "broken"), None);
    }

    #[test]
    fn groups_list_the_primary_then_memberships() {
        let group = "root:x:0:\nwheel:x:10:bob,alice\naudio:x:29:alice\nalice:x:1000:\n";
        assert_eq!(groups_of_in(group, "alice", 1000), vec![1000, 10, 29]);
    }
}
