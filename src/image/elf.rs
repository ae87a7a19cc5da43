//! Just enough ELF to tell whether a program can run inside the default guest:
//! an x86-64 executable with no program interpreter (statically linked), since
//! the guest has no dynamic loader and no libc.
//!
//! Pure: the file's first bytes in, a verdict out. Field offsets are those of
//! the ELF-64 object file format (System V gABI, "ELF Header" and "Program
//! Header"); the guest kernel runs x86-64 code only, so that is all we accept.

/// `e_ident[EI_MAG0..EI_MAG3]`.
const MAGIC: &[u8; 4] = b"\x7fELF";
/// `e_ident[EI_CLASS]` = `ELFCLASS64`.
const CLASS_64: u8 = 2;
/// `e_ident[EI_DATA]` = `ELFDATA2LSB`.
const DATA_LSB: u8 = 1;
/// `e_machine` = `EM_X86_64`.
const MACHINE_X86_64: u16 = 62;
/// Offsets in the ELF-64 header.
const E_MACHINE: usize = 0x12;
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
const HEADER_LEN: usize = 0x40;
/// `p_type` of the program header naming the dynamic loader.
const PT_INTERP: u32 = 3;
/// More program headers than this is not a program we built or packaged.
const MAX_PHNUM: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum Linkage {
    Static,
    Dynamic,
}

/// What is wrong with a file that is not an x86-64 ELF executable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 program")]
    WrongArch,
    #[error("truncated ELF file")]
    Truncated,
}

/// Static or dynamic, from the leading bytes of a file (its ELF header and
/// program header table; the first 64 KiB hold them in any real program).
pub fn linkage(bytes: &[u8]) -> Result<Linkage, ElfError> {
    let (phoff, phentsize, phnum) = program_headers(bytes)?;
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfError::Truncated)?;
        if u32_at(bytes, at)? == PT_INTERP {
            return Ok(Linkage::Dynamic);
        }
    }
    Ok(Linkage::Static)
}

/// Offset, entry size and count of the program header table.
fn program_headers(bytes: &[u8]) -> Result<(usize, usize, usize), ElfError> {
    check_ident(bytes)?;
    let phoff = usize::try_from(u64_at(bytes, E_PHOFF)?).map_err(|_| ElfError::Truncated)?;
    let phentsize = usize::from(u16_at(bytes, E_PHENTSIZE)?);
    let phnum = usize::from(u16_at(bytes, E_PHNUM)?).min(MAX_PHNUM);
    Ok((phoff, phentsize, phnum))
}

fn check_ident(bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err(ElfError::NotElf);
    }
    if bytes[4] != CLASS_64 || bytes[5] != DATA_LSB || u16_at(bytes, E_MACHINE)? != MACHINE_X86_64 {
        return Err(ElfError::WrongArch);
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    let s = b.get(at..at + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    let s = b.get(at..at + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    let s = b.get(at..at + 8).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF-64 x86-64 header with program headers of the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = CLASS_64;
        b[5] = DATA_LSB;
        b[E_MACHINE..E_MACHINE + 2].copy_from_slice(&MACHINE_X86_64.to_le_bytes());
        b[E_PHOFF..E_PHOFF + 8].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
        b[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&56u16.to_le_bytes());
        b[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn interpreter_header_means_dynamic() {
        assert_eq!(linkage(&elf(&[6, PT_INTERP, 1])), Ok(Linkage::Dynamic));
    }

    #[test]
    fn no_interpreter_means_static() {
        assert_eq!(linkage(&elf(&[1, 1, 4])), Ok(Linkage::Static));
    }

    #[test]
    fn shell_script_is_not_elf() {
        assert_eq!(linkage(b"#!/bin/sh\necho hi\n"), Err(ElfError::NotElf));
        assert_eq!(linkage(&[b'#'; 64]), Err(ElfError::NotElf));
    }

    #[test]
    fn other_architectures_are_refused() {
        let mut arm = elf(&[]);
        arm[E_MACHINE] = 183; // EM_AARCH64
        assert_eq!(linkage(&arm), Err(ElfError::WrongArch));
    }

    #[test]
    fn cut_off_program_headers_are_truncated_not_a_panic() {
        let whole = elf(&[1, PT_INTERP]);
        // The second header's p_type is cut in half.
        assert_eq!(
            linkage(&whole[..HEADER_LEN + 56 + 2]),
            Err(ElfError::Truncated)
        );
    }

    #[test]
    fn host_busybox_static_is_static() {
        let bytes = std::fs::read("/bin/busybox").unwrap();
        assert_eq!(linkage(&bytes), Ok(Linkage::Static));
    }
}
