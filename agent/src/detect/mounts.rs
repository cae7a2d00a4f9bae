//! Which file system a device belongs to, from `/proc/self/mountinfo`, without touching the
//! file system itself: a FUSE daemon that never answers, or a dead NFS server, cannot block
//! the question. Devices come from `/proc/PID/maps`, which the kernel writes from its own
//! records.

use std::collections::HashMap;

/// File-system types whose reads another process or another host answers, and may never.
const REMOTE: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "ceph",
    "afs",
    "glusterfs",
    "lustre",
    "gpfs",
    "ncpfs",
    "coda",
    "virtiofs",
];

/// Device number → file-system type, of the mounts this process sees.
#[derive(Debug, Default, Clone)]
pub(crate) struct Mounts(HashMap<u64, String>);

impl Mounts {
    /// The mounts now; empty when `/proc` cannot be read.
    pub(crate) fn read() -> Mounts {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| Mounts::parse(&t))
            .unwrap_or_default()
    }

    fn parse(text: &str) -> Mounts {
        let map = text
            .lines()
            .filter_map(|line| {
                // `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE ...`
                let mut f = line.split(' ');
                let dev = f.nth(2)?;
                let (major, minor) = dev.split_once(':')?;
                let dev = makedev(major.parse().ok()?, minor.parse().ok()?);
                let (_, after) = line.split_once(" - ")?;
                let fstype = after.split(' ').next()?;
                Some((dev, fstype.to_string()))
            })
            .collect();
        Mounts(map)
    }

    /// The type of the file system on `dev`, if it is mounted here.
    pub(crate) fn fstype(&self, dev: u64) -> Option<&str> {
        self.0.get(&dev).map(String::as_str)
    }

    /// Whether reads on `dev` are answered by a FUSE daemon or another host.
    pub(crate) fn may_hang(&self, dev: u64) -> bool {
        self.fstype(dev).is_some_and(may_hang)
    }
}

/// Whether reads on a file system of this type are answered by a FUSE daemon or another host.
pub(crate) fn may_hang(fstype: &str) -> bool {
    fstype == "fuse"
        || fstype.starts_with("fuse.")
        || fstype == "fuseblk"
        || REMOTE.contains(&fstype)
}

/// The device number of `major` and `minor`, as `stat` gives it (glibc's `makedev`).
pub(crate) fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

/// The device of a `/proc/PID/maps` line's `MAJOR:MINOR` field (hexadecimal).
pub(crate) fn maps_device(field: &str) -> Option<u64> {
    let (major, minor) = field.split_once(':')?;
    Some(makedev(
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    ))
}

/// The device of the file process `pid` runs, from its mappings of `exe`.
pub(crate) fn exe_device(pid: u32, exe: &std::path::Path) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let exe = exe.to_str()?;
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let dev = f.nth(3)?;
        let name = f.nth(1)?;
        (name == exe).then(|| maps_device(dev)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn mountinfo_lines_give_each_device_its_type() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 25 0:45 / /mnt/app rw,nosuid,nodev master:3 - fuse.squashfuse squashfuse rw,user_id=1000
41 25 0:46 / /srv/nfs rw - nfs4 host:/export rw
";
        let m = Mounts::parse(text);
        assert_eq!(m.fstype(makedev(8, 1)), Some("ext4"));
        assert!(m.may_hang(makedev(0, 45)));
        assert!(m.may_hang(makedev(0, 46)));
        assert!(!m.may_hang(makedev(8, 1)));
        assert!(
            !m.may_hang(makedev(0, 99)),
            "unknown devices are not guessed at"
        );
    }

    #[test]
    fn the_devices_of_this_process_are_found_in_its_maps_and_mounts() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let dev = exe_device(std::process::id(), &exe).unwrap();
        assert_eq!(dev, std::fs::metadata(&exe).unwrap().dev());
        assert!(Mounts::read().fstype(dev).is_some());
        assert_eq!(maps_device("fd:01"), Some(makedev(0xfd, 1)));
        assert_eq!(maps_device("x"), None);
    }
}
