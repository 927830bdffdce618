//! The embedded index's tantivy directory: tantivy's own `MmapDirectory` for everything but
//! writing segment files, which go through [`crate::paced_io::PacedWriter`] so that a new or
//! merged segment reaches the disk a megabyte at a time instead of in one `fsync` that the
//! bus's acknowledging `fdatasync` would wait behind (see the `paced_io` module).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    AntiCallToken, Directory, DirectoryLock, FileHandle, Lock, MmapDirectory, TerminatingWrite,
    WatchCallback, WatchHandle, WritePtr,
};

use crate::paced_io::PacedWriter;

#[derive(Clone, Debug)]
pub struct PacedMmapDirectory {
    inner: MmapDirectory,
    root: PathBuf,
}

impl PacedMmapDirectory {
    pub fn open(root: &Path) -> Result<Self, tantivy::directory::error::OpenDirectoryError> {
        Ok(Self {
            inner: MmapDirectory::open(root)?,
            root: root.to_path_buf(),
        })
    }
}

/// A segment file being written; like tantivy's own writer, `terminate` flushes and syncs
/// its data (the directory is synced separately, by tantivy, when the segment is published).
struct SegmentFile(PacedWriter);

impl Write for SegmentFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // As tantivy's own writer: durability comes with `terminate`.
        Ok(())
    }
}

impl TerminatingWrite for SegmentFile {
    fn terminate_ref(&mut self, _: AntiCallToken) -> std::io::Result<()> {
        self.0.finish()
    }
}

impl Directory for PacedMmapDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        self.inner.get_file_handle(path)
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        self.inner.delete(path)
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        self.inner.exists(path)
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.root.join(path))
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    OpenWriteError::FileAlreadyExists(path.to_path_buf())
                } else {
                    OpenWriteError::wrap_io_error(e, path.to_path_buf())
                }
            })?;
        Ok(BufWriter::new(Box::new(SegmentFile(PacedWriter::new(
            file,
        )))))
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        self.inner.atomic_read(path)
    }

    fn atomic_write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        self.inner.atomic_write(path, data)
    }

    fn acquire_lock(&self, lock: &Lock) -> Result<DirectoryLock, LockError> {
        self.inner.acquire_lock(lock)
    }

    fn watch(&self, watch_callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        self.inner.watch(watch_callback)
    }

    fn sync_directory(&self) -> std::io::Result<()> {
        self.inner.sync_directory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_written_through_it_read_back_and_a_second_create_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = PacedMmapDirectory::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 77).map(|i| (i % 253) as u8).collect();
        let mut w = d.open_write(Path::new("seg.idx")).unwrap();
        for chunk in data.chunks(10_000) {
            w.write_all(chunk).unwrap();
        }
        w.terminate().unwrap();
        assert_eq!(
            d.open_read(Path::new("seg.idx"))
                .unwrap()
                .read_bytes()
                .unwrap()
                .as_slice(),
            &data[..]
        );
        assert!(matches!(
            d.open_write(Path::new("seg.idx")),
            Err(OpenWriteError::FileAlreadyExists(_))
        ));
        assert!(d.exists(Path::new("seg.idx")).unwrap());
        d.delete(Path::new("seg.idx")).unwrap();
        assert!(!d.exists(Path::new("seg.idx")).unwrap());
    }
}
