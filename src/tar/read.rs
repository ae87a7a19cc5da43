//! The push parser: archive bytes in, in whatever chunks the transport
//! delivers, entries and borrowed data slices out. Pure; no I/O.
//!
//! Reads POSIX ustar (name + prefix), PAX `x` records (`path`, `linkpath`,
//! `size`, `mtime`, `uid`, `gid`; other keys ignored) and `g` headers
//! (skipped), GNU `L`/`K` long names, GNU base-256 numbers, old GNU and v7
//! headers. Every header's checksum is verified. Buffered records (PAX, GNU
//! long names) are capped at `MAX_META_RECORD` before anything is allocated;
//! file data is handed out as slices of the caller's input, never buffered.

use super::{
    show_name, Meta, TarError, AREGTYPE, BLKTYPE, BLOCK, CHKSUM, CHRTYPE, CONTTYPE, DEVMAJOR,
    DEVMINOR, DIRTYPE, FIFOTYPE, GID, GNU_LONGLINK, GNU_LONGNAME, LINKNAME, LNKTYPE, MAGIC,
    MAX_META_RECORD, MODE, MTIME, NAME, PAX_EXTENDED, PAX_GLOBAL, PREFIX, REGTYPE, SIZE, SYMTYPE,
    TYPEFLAG, UID, USTAR_MAGIC,
};

/// What an entry is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Dir,
    Fifo,
    /// A typeflag this reader does not extract (GNU sparse, volume labels…).
    Unsupported(u8),
}

impl Kind {
    /// Types whose header `size` says nothing about data that follows (as
    /// Go's `archive/tar` reads them): a lying size cannot desync the stream.
    fn is_header_only(self) -> bool {
        !matches!(self, Kind::File | Kind::Unsupported(_))
    }
}

/// One archive member, with PAX and GNU overrides applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    /// Raw archive path (not yet checked; see `extract`).
    pub path: Vec<u8>,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Bytes of data that follow (0 for header-only kinds).
    pub size: u64,
    pub meta: Meta,
    /// Device major and minor for device entries.
    pub device: (u32, u32),
    /// Offset of the entry's header in the stream.
    pub offset: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event<'a> {
    Entry(Entry),
    /// The next piece of the current entry's data.
    Data(&'a [u8]),
    /// The end-of-archive marker (two zero blocks).
    End,
}

/// Values from PAX `x` records and GNU `L`/`K` headers, for the next entry.
#[derive(Debug, Default)]
struct Overrides {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<i64>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header in `Reader::block`.
    Header,
    /// Handing out an entry's data.
    Data { remaining: u64, pad: u64 },
    /// Collecting a PAX `x` or GNU `L`/`K` record into `Reader::record`.
    Record {
        typeflag: u8,
        remaining: u64,
        pad: u64,
    },
    /// Skipping padding or a PAX `g` header.
    Skip { remaining: u64 },
    /// After the end-of-archive marker: everything else is ignored.
    End,
}

#[derive(Debug)]
pub(super) struct Reader {
    state: State,
    block: [u8; BLOCK],
    fill: usize,
    /// Bytes consumed so far.
    offset: u64,
    /// Consecutive all-zero header blocks.
    zero_blocks: u8,
    overrides: Overrides,
    /// An extended header was read and its entry has not come yet.
    pending_meta: bool,
    record: Vec<u8>,
    /// The current entry's name, for a truncation error.
    current: String,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            state: State::Header,
            block: [0; BLOCK],
            fill: 0,
            offset: 0,
            zero_blocks: 0,
            overrides: Overrides::default(),
            pending_meta: false,
            record: Vec::new(),
            current: String::new(),
        }
    }
}

/// Zero bytes that follow `size` bytes of data up to the block boundary.
pub(super) fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl Reader {
    /// Consumes a prefix of `input`: returns how many bytes were used and
    /// at most one event. Call again with the rest until it is empty.
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Event<'a>>), TarError> {
        if input.is_empty() {
            return Ok((0, None));
        }
        let avail = input.len() as u64;
        match self.state {
            State::Header => self.fill_header(input),
            State::Data { remaining, pad } => {
                let take = remaining.min(avail);
                self.offset += take;
                self.state = if take == remaining {
                    skip(pad)
                } else {
                    State::Data {
                        remaining: remaining - take,
                        pad,
                    }
                };
                Ok((take as usize, Some(Event::Data(&input[..take as usize]))))
            }
            State::Record {
                typeflag,
                remaining,
                pad,
            } => {
                let take = remaining.min(avail);
                self.record.extend_from_slice(&input[..take as usize]);
                self.offset += take;
                if take == remaining {
                    self.apply_record(typeflag)?;
                    self.state = skip(pad);
                } else {
                    self.state = State::Record {
                        typeflag,
                        remaining: remaining - take,
                        pad,
                    };
                }
                Ok((take as usize, None))
            }
            State::Skip { remaining } => {
                let take = remaining.min(avail);
                self.offset += take;
                self.state = skip(remaining - take);
                Ok((take as usize, None))
            }
            State::End => {
                self.offset += avail;
                Ok((input.len(), None))
            }
        }
    }

    fn fill_header(&mut self, input: &[u8]) -> Result<(usize, Option<Event<'static>>), TarError> {
        let take = (BLOCK - self.fill).min(input.len());
        self.block[self.fill..self.fill + take].copy_from_slice(&input[..take]);
        self.fill += take;
        self.offset += take as u64;
        if self.fill < BLOCK {
            return Ok((take, None));
        }
        self.fill = 0;
        let event = self.on_header(self.offset - BLOCK as u64)?;
        Ok((take, event))
    }

    /// Checks that the stream ended cleanly: after the end-of-archive marker
    /// or on a header boundary right after an entry.
    pub fn finish(&self) -> Result<(), TarError> {
        let what = match self.state {
            State::End => return Ok(()),
            State::Header if self.fill > 0 => "a header".to_string(),
            State::Header if self.pending_meta => "an extended header's entry".to_string(),
            State::Header => return Ok(()),
            State::Record { .. } => "an extended header".to_string(),
            State::Data { .. } | State::Skip { .. } => format!("entry {}", self.current),
        };
        Err(TarError::Truncated {
            offset: self.offset,
            what,
        })
    }

    fn on_header(&mut self, at: u64) -> Result<Option<Event<'static>>, TarError> {
        let bad = |reason: String| TarError::ParseHeader { offset: at, reason };
        if self.block.iter().all(|&b| b == 0) {
            if self.pending_meta {
                return Err(bad("an extended header is not followed by an entry".into()));
            }
            self.zero_blocks += 1;
            if self.zero_blocks < 2 {
                return Ok(None);
            }
            self.state = State::End;
            return Ok(Some(Event::End));
        }
        self.zero_blocks = 0;
        verify_checksum(&self.block).map_err(bad)?;
        let header = parse_header(&self.block).map_err(bad)?;
        match header.typeflag {
            PAX_EXTENDED | GNU_LONGNAME | GNU_LONGLINK => {
                if header.size > MAX_META_RECORD {
                    return Err(bad(format!(
                        "an extended header of {} bytes exceeds the {MAX_META_RECORD}-byte cap",
                        header.size
                    )));
                }
                self.record.clear();
                self.record.reserve(header.size as usize);
                self.state = State::Record {
                    typeflag: header.typeflag,
                    remaining: header.size,
                    pad: padding(header.size),
                };
                if header.size == 0 {
                    self.apply_record(header.typeflag)?;
                    self.state = State::Header;
                }
                Ok(None)
            }
            PAX_GLOBAL => {
                self.state = skip(header.size.saturating_add(padding(header.size)));
                Ok(None)
            }
            _ => Ok(Some(Event::Entry(self.take_entry(header, at)?))),
        }
    }

    fn take_entry(&mut self, h: Header, at: u64) -> Result<Entry, TarError> {
        let o = std::mem::take(&mut self.overrides);
        self.pending_meta = false;
        let kind = h.kind();
        let size = if kind.is_header_only() {
            0
        } else {
            o.size.unwrap_or(h.size)
        };
        let entry = Entry {
            path: o.path.unwrap_or(h.name),
            link: o.link.unwrap_or(h.link),
            kind,
            size,
            meta: Meta {
                mode: h.mode,
                mtime: o.mtime.unwrap_or(h.mtime),
                uid: o.uid.unwrap_or(h.uid),
                gid: o.gid.unwrap_or(h.gid),
            },
            device: h.device,
            offset: at,
        };
        self.current = show_name(&entry.path);
        self.state = State::Data {
            remaining: size,
            pad: padding(size),
        };
        if size == 0 {
            self.state = State::Header;
        }
        Ok(entry)
    }

    fn apply_record(&mut self, typeflag: u8) -> Result<(), TarError> {
        self.pending_meta = true;
        let record = std::mem::take(&mut self.record);
        let result = match typeflag {
            PAX_EXTENDED => parse_pax(&record, &mut self.overrides),
            GNU_LONGNAME => {
                self.overrides.path = Some(until_nul(&record).to_vec());
                Ok(())
            }
            _ => {
                self.overrides.link = Some(until_nul(&record).to_vec());
                Ok(())
            }
        };
        self.record = record;
        result.map_err(|reason| TarError::ParseHeader {
            offset: self.offset,
            reason,
        })
    }
}

fn skip(remaining: u64) -> State {
    if remaining == 0 {
        State::Header
    } else {
        State::Skip { remaining }
    }
}

/// The fields of one 512-byte header, before overrides.
#[derive(Debug)]
struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    typeflag: u8,
    size: u64,
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
    device: (u32, u32),
}

impl Header {
    fn kind(&self) -> Kind {
        match self.typeflag {
            REGTYPE | AREGTYPE if self.name.ends_with(b"/") => Kind::Dir, // v7 directories
            REGTYPE | AREGTYPE | CONTTYPE => Kind::File,
            LNKTYPE => Kind::HardLink,
            SYMTYPE => Kind::Symlink,
            CHRTYPE => Kind::CharDevice,
            BLKTYPE => Kind::BlockDevice,
            DIRTYPE => Kind::Dir,
            FIFOTYPE => Kind::Fifo,
            other => Kind::Unsupported(other),
        }
    }
}

fn field(block: &[u8; BLOCK], (at, len): (usize, usize)) -> &[u8] {
    &block[at..at + len]
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or_default()
}

/// POSIX: the checksum is the sum of the header's bytes with the checksum
/// field taken as spaces. Some old tars summed signed chars; accept both.
fn verify_checksum(block: &[u8; BLOCK]) -> Result<(), String> {
    let stored = parse_numeric(field(block, CHKSUM))
        .map_err(|e| format!("unreadable checksum field: {e}"))?;
    let (unsigned, signed) = checksums(block);
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(format!(
            "checksum mismatch: the header says {stored}, its bytes sum to {unsigned}"
        ))
    }
}

/// Unsigned and signed sums of the header with the checksum field as spaces.
pub(super) fn checksums(block: &[u8; BLOCK]) -> (i64, i64) {
    let (start, len) = CHKSUM;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (start..start + len).contains(&i) {
            b' '
        } else {
            b
        };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    (unsigned, signed)
}

fn parse_header(block: &[u8; BLOCK]) -> Result<Header, String> {
    let number = |f: (usize, usize), what: &str| {
        parse_numeric(field(block, f)).map_err(|e| format!("bad {what} field: {e}"))
    };
    let unsigned32 = |f: (usize, usize), what: &str| {
        u32::try_from(number(f, what)?).map_err(|_| format!("{what} is out of range"))
    };
    let mut name = until_nul(field(block, NAME)).to_vec();
    // Only POSIX ustar has a prefix; old GNU puts atime/ctime there.
    if field(block, MAGIC) == USTAR_MAGIC {
        let prefix = until_nul(field(block, PREFIX));
        if !prefix.is_empty() {
            name = [prefix, b"/", &name].concat();
        }
    }
    let typeflag = block[TYPEFLAG];
    let device = if matches!(typeflag, CHRTYPE | BLKTYPE) {
        (
            unsigned32(DEVMAJOR, "devmajor")?,
            unsigned32(DEVMINOR, "devminor")?,
        )
    } else {
        (0, 0)
    };
    let mode = number(MODE, "mode")?;
    if mode < 0 {
        return Err("mode is negative".into());
    }
    Ok(Header {
        name,
        link: until_nul(field(block, LINKNAME)).to_vec(),
        typeflag,
        size: u64::try_from(number(SIZE, "size")?).map_err(|_| "size is negative")?,
        mode: (mode & 0o7777) as u32,
        mtime: number(MTIME, "mtime")?,
        uid: unsigned32(UID, "uid")?,
        gid: unsigned32(GID, "gid")?,
        device,
    })
}

/// A numeric field: octal text (POSIX), or GNU base-256 when the first
/// byte's high bit is set (two's complement when the next bit is too).
pub(super) fn parse_numeric(f: &[u8]) -> Result<i64, String> {
    if let Some(&first) = f.first().filter(|&&b| b & 0x80 != 0) {
        let invert = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &b) in f.iter().enumerate() {
            let b = if i == 0 {
                (b ^ invert) & 0x7f
            } else {
                b ^ invert
            };
            if x >> 56 != 0 {
                return Err("base-256 number overflows 64 bits".into());
            }
            x = x << 8 | u64::from(b);
        }
        let x = i64::try_from(x).map_err(|_| "base-256 number overflows 64 bits")?;
        return Ok(if invert == 0xff { !x } else { x });
    }
    // Fields are NUL- or space-padded on either side by various writers.
    let text = f
        .iter()
        .position(|&b| b != b' ' && b != 0)
        .map_or(&f[..0], |start| &f[start..]);
    let end = text
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .unwrap_or(text.len());
    let (digits, rest) = text.split_at(end);
    if rest.iter().any(|&b| b != b' ' && b != 0) {
        return Err("junk after the octal number".into());
    }
    digits.iter().try_fold(0i64, |acc, &d| {
        if !(b'0'..=b'7').contains(&d) {
            return Err(format!("{:?} is not an octal digit", char::from(d)));
        }
        acc.checked_mul(8)
            .and_then(|v| v.checked_add(i64::from(d - b'0')))
            .ok_or_else(|| "octal number overflows 64 bits".to_string())
    })
}

/// PAX extended header records: `"%d %s=%s\n", length, keyword, value`,
/// the length counting the whole record including itself.
fn parse_pax(mut data: &[u8], o: &mut Overrides) -> Result<(), String> {
    while !data.is_empty() && data[0] != 0 {
        let space = data
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or("a PAX record has no length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("a PAX record's length is not a number")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a PAX record's length does not match its text".into());
        }
        let record = &data[space + 1..len - 1];
        data = &data[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a PAX record has no '='")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let bytes = || (!value.is_empty()).then(|| value.to_vec());
        match key {
            b"path" => o.path = bytes(),
            b"linkpath" => o.link = bytes(),
            b"size" => o.size = Some(pax_decimal(value, "size")?),
            b"uid" => o.uid = Some(pax_decimal(value, "uid")?),
            b"gid" => o.gid = Some(pax_decimal(value, "gid")?),
            b"mtime" => o.mtime = Some(pax_time(value)?),
            _ => {} // atime, ctime, uname, hdrcharset, SCHILY.*…: not ours
        }
    }
    Ok(())
}

fn pax_decimal<T: std::str::FromStr>(value: &[u8], key: &str) -> Result<T, String> {
    std::str::from_utf8(value)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("PAX {key} is not a number in range"))
}

/// PAX times are decimal seconds with an optional fraction (dropped here).
fn pax_time(value: &[u8]) -> Result<i64, String> {
    let whole = value.split(|&b| b == b'.').next().unwrap_or_default();
    let (negative, digits) = match whole.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, whole),
    };
    let secs: i64 = pax_decimal(digits, "mtime")?;
    Ok(if negative { -secs } else { secs })
}

#[cfg(test)]
mod tests {
    use super::super::{USTAR_VERSION, VERSION};
    use super::*;

    /// Old GNU magic+version: no prefix field (GNU `tar.h`).
    const GNU_MAGIC: &[u8; 8] = b"ustar  \0";

    /// A header block with `name`, `typeflag` and `size`, checksummed.
    fn header(name: &[u8], typeflag: u8, size: u64, magic: &[u8]) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[..name.len()].copy_from_slice(name);
        b[MODE.0..MODE.0 + 8].copy_from_slice(b"0000644\0");
        b[SIZE.0..SIZE.0 + 12].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[MTIME.0..MTIME.0 + 12].copy_from_slice(b"00000001750\0");
        b[TYPEFLAG] = typeflag;
        b[MAGIC.0..MAGIC.0 + magic.len()].copy_from_slice(magic);
        set_checksum(&mut b);
        b
    }

    fn set_checksum(b: &mut [u8; BLOCK]) {
        let (sum, _) = checksums(b);
        b[CHKSUM.0..CHKSUM.0 + 8].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn data_block(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len() + padding(data.len() as u64) as usize, 0);
        v
    }

    /// All events of `input` fed at once, data joined per entry.
    fn events(input: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
        let (mut reader, mut rest, mut out) = (Reader::default(), input, Vec::new());
        while !rest.is_empty() {
            let (used, event) = reader.next(rest)?;
            rest = &rest[used..];
            match event {
                Some(Event::Entry(e)) => out.push((e, Vec::new())),
                Some(Event::Data(d)) => out.last_mut().expect("data after entry").1.extend(d),
                Some(Event::End) | None => {}
            }
        }
        reader.finish()?;
        Ok(out)
    }

    #[test]
    fn checksum_mismatch_names_the_offset() {
        let mut archive = [
            header(b"a", REGTYPE, 0, USTAR_MAGIC),
            header(b"b", REGTYPE, 0, USTAR_MAGIC),
        ];
        archive[1][0] = b'c';

        let err = events(&archive.concat()).unwrap_err();

        assert!(
            matches!(err, TarError::ParseHeader { offset: 512, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn signed_checksum_of_old_tars_is_accepted() {
        let mut b = header(b"\xe9t\xe9", REGTYPE, 0, USTAR_MAGIC);
        let (_, signed) = checksums(&b);
        b[CHKSUM.0..CHKSUM.0 + 8].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());

        let entries = events(&b).unwrap();

        assert_eq!(entries[0].0.path, b"\xe9t\xe9");
    }

    #[test]
    fn base256_numbers_decode_positive_and_negative() {
        let positive = [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00];
        let negative = [0xff; 12];

        assert_eq!(parse_numeric(&positive), Ok(256));
        assert_eq!(parse_numeric(&negative), Ok(-1));
    }

    #[test]
    fn base256_number_overflowing_64_bits_is_an_error() {
        let huge = [0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

        assert!(parse_numeric(&huge).is_err());
    }

    #[test]
    fn octal_fields_tolerate_space_and_nul_padding() {
        assert_eq!(parse_numeric(b" 644 \0\0"), Ok(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0"), Ok(0));
        assert!(parse_numeric(b"64 4").is_err());
    }

    #[test]
    fn gnu_long_name_and_link_apply_to_the_next_entry() {
        let name = vec![b'n'; 300];
        let link = vec![b'l'; 200];
        let archive = [
            header(b"././@LongLink", GNU_LONGNAME, 301, GNU_MAGIC).to_vec(),
            data_block(&[&name[..], b"\0"].concat()),
            header(b"././@LongLink", GNU_LONGLINK, 200, GNU_MAGIC).to_vec(),
            data_block(&link),
            header(b"short", SYMTYPE, 0, GNU_MAGIC).to_vec(),
        ]
        .concat();

        let entries = events(&archive).unwrap();

        assert_eq!(
            (entries[0].0.path.clone(), entries[0].0.link.clone()),
            (name, link)
        );
    }

    #[test]
    fn old_gnu_header_ignores_the_prefix_area() {
        let mut b = header(b"name", REGTYPE, 0, GNU_MAGIC);
        b[PREFIX.0..PREFIX.0 + 4].copy_from_slice(b"junk");
        set_checksum(&mut b);

        let entries = events(&b).unwrap();

        assert_eq!(entries[0].0.path, b"name");
    }

    #[test]
    fn ustar_prefix_is_joined_to_the_name() {
        let mut b = header(b"name", REGTYPE, 0, USTAR_MAGIC);
        b[VERSION.0..VERSION.0 + 2].copy_from_slice(USTAR_VERSION);
        b[PREFIX.0..PREFIX.0 + 3].copy_from_slice(b"dir");
        set_checksum(&mut b);

        let entries = events(&b).unwrap();

        assert_eq!(entries[0].0.path, b"dir/name");
    }

    #[test]
    fn v7_header_with_trailing_slash_is_a_directory() {
        let b = header(b"olddir/", AREGTYPE, 0, b"");

        let entries = events(&b).unwrap();

        assert_eq!(entries[0].0.kind, Kind::Dir);
    }

    #[test]
    fn pax_size_mtime_and_path_override_the_header() {
        let records =
            b"16 path=long/\xc3\xa9\n16 size=0000003\n18 mtime=-12.5000\n15 unknown=key\n";
        let archive = [
            header(
                b"PaxHeader",
                PAX_EXTENDED,
                records.len() as u64,
                USTAR_MAGIC,
            )
            .to_vec(),
            data_block(records),
            header(b"short", REGTYPE, 0, USTAR_MAGIC).to_vec(),
            data_block(b"abc"),
        ]
        .concat();

        let entries = events(&archive).unwrap();

        let (entry, data) = &entries[0];
        assert_eq!(
            (&entry.path[..], entry.size, entry.meta.mtime),
            (&b"long/\xc3\xa9"[..], 3, -12)
        );
        assert_eq!(data, b"abc");
    }

    #[test]
    fn pax_record_with_a_wrong_length_is_an_error() {
        let records = b"99 path=x\n";
        let archive = [
            header(
                b"PaxHeader",
                PAX_EXTENDED,
                records.len() as u64,
                USTAR_MAGIC,
            )
            .to_vec(),
            data_block(records),
        ]
        .concat();

        let err = events(&archive).unwrap_err();

        assert!(err.to_string().contains("length does not match"), "{err}");
    }

    #[test]
    fn pax_header_over_the_cap_is_refused_before_buffering() {
        let b = header(b"PaxHeader", PAX_EXTENDED, 1 << 20, USTAR_MAGIC);

        let err = events(&b).unwrap_err();

        assert!(err.to_string().contains("cap"), "{err}");
    }

    #[test]
    fn global_pax_header_is_skipped() {
        let archive = [
            header(b"global", PAX_GLOBAL, 600, USTAR_MAGIC).to_vec(),
            vec![b'z'; 1024],
            header(b"file", REGTYPE, 0, USTAR_MAGIC).to_vec(),
        ]
        .concat();

        let entries = events(&archive).unwrap();

        assert_eq!(entries[0].0.path, b"file");
    }

    #[test]
    fn symlink_size_field_does_not_consume_data() {
        let archive = [
            header(b"link", SYMTYPE, 1000, USTAR_MAGIC),
            header(b"next", REGTYPE, 0, USTAR_MAGIC),
        ]
        .concat();

        let entries = events(&archive).unwrap();

        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn stream_cut_inside_data_is_truncated() {
        let archive = [
            header(b"f", REGTYPE, 100, USTAR_MAGIC).to_vec(),
            vec![1; 50],
        ]
        .concat();

        let err = events(&archive).unwrap_err();

        assert_eq!(
            err.to_string(),
            "the archive ends in the middle of entry f (byte 562); the stream was cut short"
        );
    }

    #[test]
    fn one_zero_block_then_end_of_stream_is_clean() {
        let archive = [header(b"f", REGTYPE, 0, USTAR_MAGIC), [0; BLOCK]].concat();

        assert!(events(&archive).is_ok());
    }

    #[test]
    fn bytes_after_the_end_marker_are_ignored() {
        let archive = [
            header(b"f", REGTYPE, 0, USTAR_MAGIC),
            [0; BLOCK],
            [0; BLOCK],
            [7; BLOCK],
        ]
        .concat();

        assert_eq!(events(&archive).unwrap().len(), 1);
    }
}
