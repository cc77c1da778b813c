"""Writing files safely: every writer of ddpm_fashion goes through these few functions.

The rules they keep: an output is checked before any work (its folder exists and is writable, it is not a file a
reader depends on); a file or folder is written under a temporary name beside its target and renamed into place
only when complete, so a crash leaves the old version or the new one, never half of one; nothing is deleted that
this package did not write; a folder one process writes to is locked against a second.

A leaf module: it imports nothing of ddpm_fashion, so any module may use it without an import cycle.
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

STAGING_PREFIX = ".ddpm_fashion-staging-"
STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-.")


def probe_writable(folder: Path, what: str) -> None:
    """Raise a one-line ValueError unless a file can be created in the existing folder."""
    try:  # os.access says yes to root even on read-only mounts, so ask the file system itself
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{what} is not writable: {error.strerror} ({folder})") from None


def is_within(path: Path, folder: Path) -> bool:
    """Whether path is folder or lies inside it, after resolving links."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_not_protected(path: Path, protected: Iterable[Path], what: str,
                        why: str = "which is read by this command or ships with ddpm_fashion") -> None:
    """Raise a one-line ValueError if path is, or lies inside, one of the protected files or folders."""
    for guarded in protected:
        if is_within(path, guarded):
            raise ValueError(f"{what} {path} would overwrite {guarded}, {why}; give a path outside it")


# protected_in(folder): what no output may replace in a folder on the way up from an output ([] for most folders).
ProtectedIn = Callable[[Path], Iterable[Path]]


def check_outside_model_folders(path: Path, what: str, protected_in: Optional[ProtectedIn]) -> None:
    """Raise a one-line ValueError if path is, or lies inside, what protected_in names for any folder above it.

    Both the path as given and the path its links resolve to are walked up, to the root.
    """
    if protected_in is None:
        return
    for walked in dict.fromkeys((Path(os.path.abspath(path)), Path(path).resolve())):
        for folder in walked.parents:
            guarded = list(protected_in(folder))
            if guarded == [folder] and is_within(path, folder):  # a checkpoint is protected whole
                raise ValueError(f"{what} {path} lies inside the checkpoint {folder}, which no output may write "
                                 "into; give a path outside it")
            check_not_protected(path, guarded, what, f"part of the model in {folder}")


def check_name_fits(path: Path, what: str, staging_name: Optional[str] = None) -> None:
    """Raise a one-line ValueError if a name of path, or the temporary name it is written under, is too long.

    Runs before anything looks at path: the file system answers a name over its limit with ENAMETOOLONG.
    """
    absolute = Path(os.path.abspath(path))
    existing = absolute.parent
    while not os.path.lexists(existing):  # lexists answers False, where exists() raises, for a name too long
        existing = existing.parent
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for name in absolute.parts[1:-1]:
        if len(os.fsencode(name)) > name_max:
            raise ValueError(f"{what}: its folder name {name[:20]}... has {len(os.fsencode(name))} bytes; this file "
                             f"system allows at most {name_max}")
    staging_name = staging_name or absolute.name
    length, staged = len(os.fsencode(absolute.name)), len(os.fsencode(staging_name))
    if staged > name_max:
        why = f" ({name_max} minus {staged - length} for the temporary name it is written under)" if staged > length \
            else ""
        raise ValueError(f"{what}: the name has {length} bytes; at most {name_max - (staged - length)} are allowed "
                         f"here{why}")
    if len(os.fsencode(str(absolute.parent / staging_name))) >= path_max:
        raise ValueError(f"{what}: the path has {len(os.fsencode(str(absolute)))} bytes; this file system allows "
                         f"fewer than {path_max - (staged - length)} here")


def check_not_a_link(path: Path, what: str) -> None:
    """Raise a one-line ValueError if path is a symbolic link: a rename into place would replace the link itself."""
    if os.path.islink(path):
        target = os.readlink(path)
        state = "" if os.path.exists(path) else ", which does not exist"
        raise ValueError(f"{what} {path} is a symbolic link (to {target}{state}); writing would replace the link, so "
                         "give the real path or a new name")


def check_output_path(path: str, suffixes: Iterable[str], protected: Iterable[Path] = (),
                      protected_in: Optional[ProtectedIn] = None, new: bool = False) -> Path:
    """Get an output file path, or raise a one-line ValueError unless it can be written as one of `suffixes`.

    `protected` lists files and folders the output must not replace (the model being read, shipped weights);
    `protected_in(folder)` lists those of any folder above the output (the entries of a model folder). With
    new=True the output must not exist at all (only a file continued by its own command may, new=False). A path
    that is a symbolic link, dangling or not, is refused either way.
    """
    suffixes = tuple(suffixes)
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise ValueError(f"output {path} must end in one of: {', '.join(suffixes)}")
    check_name_fits(target, f"output {path}", f".{target.name}.{'x' * MKSTEMP_RANDOM}{target.suffix}")
    if target.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name")
    check_not_protected(target, protected, "output")
    check_outside_model_folders(target, "output", protected_in)
    check_not_a_link(target, "output")
    if new and target.exists():
        raise ValueError(f"output {path} exists; give a new name or delete it first (an existing file is never "
                         "replaced)")
    check_parent_folder(target, f"output {path} cannot be written")
    probe_writable(target.parent, f"output {path}")
    return target


def check_new_folder(path: str, what: str, protected: Iterable[Path] = (),
                     protected_in: Optional[ProtectedIn] = None) -> Path:
    """Get a folder path to create, or raise a one-line ValueError unless it is absent or empty and creatable.

    `protected` and `protected_in` are as for check_output_path.
    """
    folder = Path(path)
    check_name_fits(folder, f"{what} {path}", staging_path(Path(os.path.abspath(folder))).name)
    check_not_protected(folder, protected, what)
    check_outside_model_folders(folder, what, protected_in)
    check_not_a_link(folder, what)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {path} exists and is not a directory")
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{what} {path} is not empty; give a new or empty folder (nothing in it is ever replaced)")
    check_parent_folder(folder, f"{what} {path} cannot be created")
    probe_writable(Path(os.path.abspath(folder)).parent, f"{what} {path}")
    return folder


def check_parent_folder(path: Path, what: str) -> None:
    """Raise a one-line ValueError, starting with `what`, unless the folder path goes into exists as a folder."""
    folder = Path(path).parent
    if folder.is_dir():
        return
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing == folder or not existing.is_dir():
        raise ValueError(f"{what}: {existing} is not a directory")
    raise ValueError(f"{what}: directory {folder} does not exist")


# Characters tempfile.mkstemp puts between the prefix and suffix atomic_output gives it.
MKSTEMP_RANDOM = 8


def _current_umask() -> int:
    """Get the process umask (reading it means setting it, so it is put straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write to; on success it replaces `path`."""
    path = Path(path)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(staging)
        match_umask(staging)  # mkstemp makes files private; outputs get the usual mode
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def staging_path(final: Path, owner: Optional[int] = None) -> Path:
    """Get the temporary name a folder or file is written under before it is renamed to `final`.

    The name carries our prefix and the writing process's pid (`owner`, default this process), which is what lets
    remove_stale_staging prove a leftover is ours and that its writer is dead.
    """
    final = Path(final)
    return final.with_name(f"{STAGING_PREFIX}{os.getpid() if owner is None else owner}-{final.name}")


def staging_owner(path: Path) -> Optional[int]:
    """Get the pid a staging_path name carries (None: not a name staging_path makes)."""
    match = STAGING_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def _is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def match_umask(path: Path) -> None:
    """Give a file, or every file and folder under a folder, the mode the umask gives new ones (0644/0755 under 022).

    safetensors and tempfile create files readable by their owner only; what we publish must load for everyone
    the umask lets read it.
    """
    path, umask = Path(path), _current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def scratch_folder(path: Path) -> Iterator[Path]:
    """Yield `path` (a staging_path) as a new empty folder; remove it if the block fails."""
    path = Path(path)
    if path.exists() and staging_owner(path) == os.getpid():
        shutil.rmtree(path)  # this process's own leftover (an in-process caller that ran before): never another's
    path.mkdir(parents=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


@contextmanager
def staged_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; rename it to `final` only if the block completes.

    `final` must not exist (or be an empty folder), unless replace=True: then the old folder is moved aside and
    deleted only after the new one is in place. On error the temporary folder is removed and `final` is untouched.
    """
    final = Path(final)
    with scratch_folder(staging_path(final)) as staging:
        yield staging
        match_umask(staging)
    previous = None
    if final.exists() and replace:
        previous = staging_path(final.with_name("previous-" + final.name))
        os.replace(final, previous)
    elif final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.replace(staging, final)  # fails, keeping both, if final appeared meanwhile and is not empty
    if previous is not None:
        shutil.rmtree(previous)


def move_files_into(staging: Path, folder: Path) -> None:
    """Move every file of a complete staging folder to the same relative path in `folder`, then remove staging.

    Files of the same name are replaced (each rename is atomic); files in `folder` that staging does not hold are
    never touched, so publishing never deletes anything it did not write.
    """
    staging, folder = Path(staging), Path(folder)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for source in files:
        target = folder / source.relative_to(staging)
        if target.is_dir():
            raise ValueError(f"cannot write {target}: a folder of that name is in the way")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging)


def remove_stale_staging(folder: Path) -> List[Path]:
    """Remove the staging files and folders in `folder` whose writer is dead (a process killed mid-write).

    Only names staging_path makes (our prefix and a pid) whose process no longer exists are removed; anything else,
    a user's `.tmp-notes.txt` included, is never touched. Returns what was removed.
    """
    removed = []
    for stale in sorted(Path(folder).glob(STAGING_PREFIX + "*")) if Path(folder).is_dir() else []:
        owner = staging_owner(stale)
        if owner is not None and not _is_alive(owner):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
            removed.append(stale)
    return removed


def folder_size(folder: Path) -> int:
    """Get the total size in bytes of the files under a folder."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def is_disk_full(error: BaseException) -> bool:
    """Whether an error means the file system ran out of space (or quota).

    Python raises OSError(ENOSPC); safetensors' Rust writer raises SafetensorError, which is no OSError, with the
    operating system's message in its text.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def free_bytes(folder: Path) -> int:
    """Get the bytes free for this user on the file system holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


class FolderLock:
    """An exclusive lock on a folder, held by one process for as long as it writes there.

    It is an advisory `flock` on `<folder>/.lock`: the operating system releases it when the holder exits or is
    killed, so a dead run never holds a folder. The file records the holder (pid, host, start time) for the message
    another process gets; it is left in place after release (deleting it would race with a new holder).
    """

    NAME = ".lock"

    def __init__(self, folder: Path, what: str):
        self.path = Path(folder) / self.NAME
        self.what = what
        self._handle = None

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise a one-line ValueError naming the process that holds it."""
        self._check_is_file(self.path, self.what)
        handle = open(self.path, "a+")
        try:
            _lock_or_name_holder(handle, self.what)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    @classmethod
    def check_free(cls, folder: Path, what: str) -> None:
        """Raise the same one-line ValueError as acquire() if another process holds the lock (writes nothing)."""
        path = Path(folder) / cls.NAME
        cls._check_is_file(path, what)
        if not path.is_file():
            return
        with open(path) as handle:
            _lock_or_name_holder(handle, what, shared=True)
            fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _check_is_file(path: Path, what: str) -> None:
        """Raise a one-line ValueError if something other than a lock file has the lock file's name."""
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ValueError(f"{what} has a {path.name} that is not a lock file ({path}); we never remove what we did "
                             "not write, so move it away or choose another folder")

    def release(self) -> None:
        """Give the lock up (closing the file releases the flock)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _lock_or_name_holder(handle, what: str, shared: bool = False) -> None:
    """Take the flock on an open lock file, or raise a one-line ValueError naming the process that holds it.

    shared=True takes a shared lock: it fails only where a run holds the folder (exclusively), so the processes of
    one launch may check a folder at the same time without refusing each other.
    """
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        raise ValueError(f"{what} is in use by another run ({_describe_holder(handle.read())}); wait for it to "
                         "finish or choose another folder") from None


def _describe_holder(text: str) -> str:
    """Get 'pid N on HOST since TIME' from a lock file's record (or what is known of it)."""
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on {record['host']} since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


def read_json_object(path: Path, what: Optional[str] = None) -> dict:
    """Read a JSON file that must hold an object, or raise a one-line ValueError naming the file."""
    what = what or str(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} is missing") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None
    except ValueError as error:
        raise ValueError(f"{what} is not valid JSON ({' '.join(str(error).split())})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(value).__name__}")
    return value


def sha256_of_file(path: Path) -> str:
    """Get the hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
