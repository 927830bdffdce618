//! Background files (archive objects, search index segments) reach the disk in small pieces.
//!
//! The bus acknowledges a group of appends after `fdatasync`, which ends with a flush of the
//! disk's write cache. That flush waits for every write in flight, and on virtual disks whose
//! host keeps the image in its own page cache, for everything the guest wrote since the last
//! flush. A multi-megabyte file synced in one go by a background writer lands in one of those
//! flushes and shows up in the ack latency (docs/benchmarks.md, "Background writes in
//! pieces": a probe's 512 KiB `fdatasync` p99 went from 6.6–9.6 ms to 2.7–3.1 ms beside a
//! writer of 16 MiB files once that writer wrote back 1 MiB at a time). The functions here
//! start write-back every [`PIECE`] bytes and wait for it (`sync_file_range`, Linux), so each
//! flush of the bus carries at most about one piece of background data; a final `fsync`
//! still makes each file durable as before.
//!
//! Files written with direct I/O (the bus log, local archive objects) skip the page cache;
//! [`open_direct`] and [`DIRECT_ALIGN`] are what they share.

use std::fs::File;
use std::io::Write;

/// Alignment of direct I/O: file offset, length and memory address (4 KiB covers every
/// logical block size Linux file systems use).
pub const DIRECT_ALIGN: usize = 4096;

/// Opens `path` with `O_DIRECT` added to `options`; `None` where the file system refuses
/// direct I/O (or off Linux), so the caller falls back to buffered I/O.
pub fn open_direct(
    options: &mut std::fs::OpenOptions,
    path: &std::path::Path,
) -> std::io::Result<Option<File>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match options.custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (options, path);
        Ok(None)
    }
}

/// Bytes written back at a time.
pub const PIECE: u64 = 1 << 20;

/// Writes back bytes `from..from + len` of `file` (already written), [`PIECE`] by piece,
/// waiting for each. Only schedules and waits for the data: the caller's `fsync` is still
/// what makes it durable. Does nothing off Linux.
pub fn write_back(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let mut at = from;
        while at < from + len {
            let n = PIECE.min(from + len - at);
            // SAFETY: sync_file_range only reads its integer arguments; the descriptor is
            // open for as long as `file` is borrowed.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), at as i64, n as i64, flags) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // Not supported here (some file systems): the final fsync does it all.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE)
                ) {
                    return Ok(());
                }
                return Err(e);
            }
            at += n;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, len);
    Ok(())
}

/// `fsync` of a whole file that was written without [`PacedWriter`]: its dirty data is written
/// back a piece at a time first.
pub fn sync_all(file: &File) -> std::io::Result<()> {
    write_back(file, 0, file.metadata()?.len())?;
    file.sync_all()
}

/// A file writer that writes back every [`PIECE`] as it goes (for long sequential writes: an
/// index segment, a merge). [`PacedWriter::finish`] syncs the data.
pub struct PacedWriter {
    file: File,
    written: u64,
    written_back: u64,
}

impl PacedWriter {
    pub fn new(file: File) -> Self {
        Self {
            file,
            written: 0,
            written_back: 0,
        }
    }

    /// Writes back what is left and `fdatasync`s the file.
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.write_back_pending()?;
        self.file.sync_data()
    }

    /// Writes back everything written since the last write-back.
    fn write_back_pending(&mut self) -> std::io::Result<()> {
        write_back(
            &self.file,
            self.written_back,
            self.written - self.written_back,
        )?;
        self.written_back = self.written;
        Ok(())
    }
}

impl Write for PacedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.written_back >= PIECE {
            self.write_back_pending()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_paced_writer_writes_every_byte_in_order_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = PacedWriter::new(File::create(&path).unwrap());
        let mut expected = Vec::new();
        // Odd-sized writes across several pieces.
        for i in 0..700u32 {
            let chunk: Vec<u8> = (0..(i * 37 % 9000)).map(|j| (i + j) as u8).collect();
            w.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        assert!(expected.len() as u64 > 2 * PIECE);
        w.finish().unwrap();
        assert_eq!(w.written_back, expected.len() as u64);
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn syncing_a_file_in_pieces_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 * PIECE + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        sync_all(&File::open(&path).unwrap()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
