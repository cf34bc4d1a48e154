"""Safe outputs: checked before the work, written atomically, never touching what quantkit did not write.

Rules (shared/DESIGN.md, "user data is sacred"):

- ``check_output_dir`` / ``check_output_file`` run before any work: the output must not be, hold
  or lie inside an input of the run; its folder must be writable (a probe file is created and
  removed, so read-only file systems, immutable folders and permissions are all caught the same
  way); there must be room for the expected bytes.
- A folder of artifacts is written through ``output_dir``: into a staging folder, then either
  renamed into place in one step (a new folder) or, for an existing folder (an empty mount
  point, where renaming the folder itself fails with EBUSY, or a folder of an earlier run with
  ``--force``), moved in file by file, each rename atomic, the manifest last.
- ``MANIFEST`` (``quantkit-manifest.json``) lists every file a run wrote with its SHA-256.
  ``--force`` replaces only files that a manifest lists and that still have the recorded
  content; a folder without a manifest, or a file the user changed or added, is never replaced
  or deleted.
- Files and folders get the permissions of the user's umask, like any other program's output.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from quantkit.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

MANIFEST = "quantkit-manifest.json"

_umask_lock = threading.Lock()


class OutputError(InputError):
    """The output location cannot be written, or would overlap an input."""


def current_umask() -> int:
    """The process umask (read by setting and restoring it; guarded against other threads)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _apply_umask(path: Path, *, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error(err: OSError, path: Path, what: str) -> OutputError:
    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (immutable?)",
              errno.EDQUOT: "disk quota exceeded"}.get(err.errno or 0, err.strerror or str(err))
    return OutputError(f"cannot {what} {str(path)!r}: {reason}",
                       hint="choose another output location (-o) or free/allow it; nothing was written")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename), with
    the permissions of the umask."""
    return write_chunks_atomic(path, (data,))


def write_chunks_atomic(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> Path:
    """``write_bytes_atomic`` for data given in pieces (an external data file of several GB is
    written without joining it in memory)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str], data: bytes) -> Iterator[Callable[[], Path]]:
    """``data`` written now to a temporary file beside ``path`` (fsync'ed, the umask's
    permissions); the context gives a function that renames it into place. Not called, or an
    error in the block: the temporary file is removed and ``path`` is as it was. For an output
    that must appear only when another one (an output folder) is committed: a full disk shows
    before either is in place."""
    target = Path(path)
    made = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    committed = False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except BaseException:
        _remove_empty(made)
        raise

    def commit() -> Path:
        nonlocal committed
        os.replace(tmp, target)
        committed = True
        _fsync_dir(target.parent)
        return target

    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield commit
    finally:
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            _remove_empty(made)  # the folders made for it: a failed run leaves none behind


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty; a folder something else filled stays."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as JSON that any parser reads (RFC 8259 has no Infinity or NaN): a float that is
    not finite (the SQNR of identical outputs) is written as the string "inf", "-inf" or "nan",
    which ``float()`` reads back."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NumPy's too) as "inf", "-inf" or "nan"."""
    import math

    if isinstance(obj, float):  # np.float64 is a float
        return obj if math.isfinite(obj) else "nan" if math.isnan(obj) else "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # np.float32, np.int64, 0-d arrays
        return json_safe(obj.item())
    return obj


def input_file(path: str | os.PathLike[str], what: str, error: type[InputError] = InputError) -> Path:
    """``path`` when it names a regular file to read, else one line (``error``) saying why: empty,
    missing, a folder, or not a regular file. A device or a pipe is refused before it is opened:
    /dev/zero read without end (GBs in seconds), a FIFO without a writer blocked for ever."""
    p = Path(path)
    if not str(path):
        raise error(f"an empty path was given for the {what}", hint=f"give the path of the {what}")
    if not p.exists():
        raise error(f"{what} {str(p)!r} does not exist", hint="check the path")
    article = "an" if what[:1].lower() in "aeio" or what.startswith("ONNX") else "a"
    if p.is_dir():
        raise error(f"{str(p)!r} is a folder, not {article} {what}",
                    hint=f"give the path of the {what}" + ("" if what.endswith("file") else " file"))
    if not p.is_file():
        raise error(f"{str(p)!r} is not a regular file (a device, pipe or socket), not {article} {what}",
                    hint=f"save the {what} to a file and give its path")
    return p


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ checks before the work
def _resolved(p: str | os.PathLike[str]) -> Path:
    try:
        return Path(os.path.abspath(os.path.expanduser(p))).resolve()
    except (RuntimeError, OSError) as err:  # a symbolic link loop (`ln -s x x`): RuntimeError before Python 3.13
        why = err.strerror if isinstance(err, OSError) and err.strerror else "a loop of symbolic links"
        raise InputError(f"{os.fsdecode(p)!r} cannot be resolved: {why}", hint="point it at a real file or folder") from None


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` that exists; a regular file in the way is an error."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot create {str(path)!r}: {str(p)!r} is a file, not a folder",
                                  hint="choose an output path that is not below a file")
            return p
    return Path("/")  # pragma: no cover - the root always exists


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX model file names (``location`` entries, in its folder),
    existing ones only; none for a file that is not a readable ONNX model. They are inputs too:
    an output written over one destroys the model's weights."""
    p = Path(path)
    if p.suffix.lower() != ".onnx" or not p.is_file():
        return []
    st = p.stat()
    return list(_external_data_files(str(p.resolve()), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _external_data_files(path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """``external_data_files`` of one version of a file (a model is read once per run)."""
    p = Path(path)
    try:
        import onnx

        from quantkit.onnx.model import external_locations

        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model (refused elsewhere, with its own message)
        return ()
    found = [p.parent / loc for _, loc in external_locations(model) if loc and (p.parent / loc).exists()]
    return tuple(dict.fromkeys(found))


def _check_overlap(out: Path, inputs: Iterable[str | os.PathLike[str]], *, what: str) -> None:
    """Refuse an output that is, holds or lies inside an input (file or folder); an ONNX model's
    external data files are inputs too."""
    target = _resolved(out)
    given = [raw for raw in inputs if raw is not None]
    for raw in [*given, *(f for g in given for f in external_data_files(g))]:
        src = _resolved(raw)
        if target == src:
            relation = "is"
        elif target in src.parents:
            relation = "holds"
        elif src in target.parents and src.is_dir():
            relation = "is inside"
        else:
            continue
        raise OutputError(f"{what} {str(out)!r} {relation} the input {str(raw)!r}; quantkit never writes over "
                          "or into its inputs", hint="choose an output location outside the model and data")


def _check_name_length(out: Path, base: Path, extra: int) -> None:
    """The temporary name quantkit writes ``out`` under (``extra`` bytes longer) fits the file
    system: a 245-byte -o passed the checks and failed after the work ("File name too long")."""
    try:
        limit = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(out.name))
    if size + extra > limit:
        raise OutputError(f"output name {out.name[:40]!r}... is {size} bytes; quantkit writes it under a temporary "
                          f"name {extra} bytes longer, and names here hold at most {limit}",
                          hint=f"choose a name of at most {limit - extra} bytes")


def _probe_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=folder)
    except OSError as err:
        raise _os_error(err, folder, "write into") from err
    os.close(fd)
    os.unlink(probe)


def _check_space(folder: Path, need_bytes: int) -> None:
    if need_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes:
        raise OutputError(f"not enough space in {str(folder)!r}: about {need_bytes / 2**20:.1f} MiB needed, "
                          f"{free / 2**20:.1f} MiB free", hint="free some space or choose another -o")


def inside(folder: Path, name: str) -> bool:
    """``name`` is a file of ``folder`` itself: a relative path without ``..``, reached through no
    symlink below ``folder``, so that writing or removing ``folder / name`` touches nothing
    outside it (a manifest's entries, a stats file written inside -o)."""
    rel = Path(name)
    if not name or rel.is_absolute() or any(part in ("..", "") for part in rel.parts) or rel.drive:
        return False
    at = Path(folder)
    for part in rel.parts[:-1]:
        at = at / part
        if at.is_symlink() or (at.exists() and not at.is_dir()):
            return False
    return True


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an earlier run in ``folder``, or None (absent, not quantkit's, or listing a
    file outside ``folder``: ``inside``; such a manifest was not written by quantkit, and ``--force``
    must not remove what it lists)."""
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # (a document nested past Python's recursion limit)
        return None
    if not isinstance(doc, dict) or doc.get("tool") != "quantkit" or not isinstance(doc.get("files"), dict):
        return None
    if not all(isinstance(n, str) and inside(Path(folder), n) for n in doc["files"]):
        return None
    return doc


def _ours(folder: Path, manifest: dict[str, Any] | None, name: str) -> bool:
    """``name`` in ``folder`` was written by quantkit and is unchanged since."""
    if manifest is None:
        return False
    entry = manifest["files"].get(name)
    path = folder / name
    if not isinstance(entry, dict) or not path.is_file() or path.is_symlink():
        return False
    return file_sha256(path) == entry.get("sha256")


def _checked(check: Any) -> Any:
    """Turn a file-system error met while checking an output into one readable line."""
    import functools

    @functools.wraps(check)
    def wrapper(path: str | os.PathLike[str], **kwargs: Any) -> Path:
        try:
            return check(path, **kwargs)
        except OSError as err:
            raise _os_error(err, Path(err.filename or path), "write into") from err

    return wrapper


#: commands that write the same kind of folder (a calibration's artifacts)
_SAME_KIND = {"quantkit merge-stats": "quantkit calibrate"}


def _kind(command: Any) -> Any:
    return _SAME_KIND.get(command, command)


@_checked
def check_output_dir(path: str | os.PathLike[str], *, force: bool, inputs: Sequence[Any] = (),
                     need_bytes: int = 0, command: str | None = None, names: Iterable[str] = ()) -> Path:
    """Check, before any work, that ``path`` can receive a set of artifacts (``names``: the
    files the command will write there, as far as it knows them before the work: with ``force``,
    one of them that is not quantkit's is refused now, not after the work).

    A missing folder (and missing parents) is fine; an empty folder is written in place; a
    non-empty one needs ``force`` and a manifest of an earlier quantkit run (files quantkit did
    not write are never replaced, and stay) of the same ``command`` (a ``report --force`` into a
    calibration's folder would replace its INT8 model with a report: refused). Raises
    ``OutputError``/``OutputExistsError`` (exit 2) with one line.
    """
    out = Path(path)
    _check_overlap(out, inputs, what="output folder")
    if out.is_symlink() and not out.exists():  # found only when the work was done (it cannot be made)
        raise OutputError(f"output folder {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does not exist",
                          hint="create the folder it points to, or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} exists and is not a folder",
                                hint="choose a folder for -o")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"output folder {str(out)!r} exists and is not empty",
                                    hint="pass --force to replace quantkit's earlier artifacts there, or choose another -o")
        manifest = read_manifest(out)
        if manifest is None:
            why = (f"its {MANIFEST} is not one quantkit wrote (unreadable, or it lists files outside the folder)"
                   if (out / MANIFEST).exists() else f"no {MANIFEST}")
            raise OutputExistsError(
                f"output folder {str(out)!r} holds files that quantkit did not write ({why})",
                hint="--force replaces only quantkit's own artifacts; choose a new or empty folder")
        before = manifest.get("command")
        if command is not None and isinstance(before, str) and _kind(before) != _kind(command):
            raise OutputExistsError(
                f"output folder {str(out)!r} holds the results of `{before}`; --force replaces only an earlier "
                f"`{command}`'s", hint="choose another -o (nothing was replaced)")
        changed = [n for n in manifest["files"] if (out / n).exists() and not _ours(out, manifest, n)]
        if changed:
            raise OutputExistsError(
                f"{str(out / changed[0])!r} was written by quantkit but changed since; --force will not replace it",
                hint="move it away or choose another -o")
        theirs = [n for n in names if ((out / n).exists() or (out / n).is_symlink()) and not _ours(out, manifest, n)]
        if theirs:  # the user's own file of an artifact's name: refused before the work, as at the end
            raise OutputExistsError(f"{str(out / theirs[0])!r} exists and was not written by quantkit",
                                    hint="move it away or choose another -o; nothing was replaced")
    base = _existing_ancestor(out)
    if not out.exists():  # staged beside it (an existing folder is written in place)
        _check_name_length(out, base, len(".") + len(".12345678.partial"))
    _probe_writable(base)
    _check_space(base, need_bytes)
    return out


@_checked
def check_output_file(path: str | os.PathLike[str], *, force: bool, inputs: Sequence[Any] = (),
                      need_bytes: int = 0, replaceable: Any = None, what: str = "") -> Path:
    """Check, before any work, that the single file ``path`` can be written: not an input, not
    an existing file unless ``force`` (and, given ``replaceable``, a predicate on the path, only a
    file it accepts: ``what`` says which, e.g. "a quantkit statistics file"), its folder
    writable, room for ``need_bytes``."""
    out = Path(path)
    _check_overlap(out, inputs, what="output file")
    if out.name == MANIFEST:  # another run's list of its files: --force would make that folder unusable
        raise OutputError(f"{str(out)!r} is the name of quantkit's manifest of a folder's files",
                          hint="choose another file name")
    if out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} is a folder", hint="give a file name")
    if out.exists() and not force:
        raise OutputExistsError(f"{str(out)!r} exists", hint="pass --force to overwrite it, or choose another name")
    if out.exists():
        listed = listing_folder(out)
        if listed is not None:  # another run's artifact: replacing it would leave that folder inconsistent
            raise OutputExistsError(f"{str(out)!r} is one of the files quantkit wrote into {str(listed)!r} (its "
                                    f"{MANIFEST}); --force does not replace it from another command",
                                    hint="choose another name (nothing was replaced)")
    if out.exists() and replaceable is not None and not replaceable(out):
        raise OutputExistsError(f"{str(out)!r} exists and is not {what or 'a file quantkit wrote'}; --force "
                                "replaces only such a file", hint="choose another name (nothing was replaced)")
    base = _existing_ancestor(out.parent)
    _check_name_length(out, base, len(".") + len(".12345678.tmp"))
    _probe_writable(base)
    _check_space(base, need_bytes)
    return out


def listing_folder(path: str | os.PathLike[str], levels: int = 8) -> Path | None:
    """The folder (``path``'s own or one of its ``levels`` nearest ancestors) whose quantkit
    manifest lists ``path`` as one of its files, or None."""
    p = Path(os.path.abspath(path))
    for folder in list(p.parents)[:levels]:
        doc = read_manifest(folder)
        if doc is not None and p.relative_to(folder).as_posix() in doc["files"]:
            return folder
    return None


#: a JSON file larger than this is not one of quantkit's results (kilobytes to a few MiB) and is not
#: read: what ``--force`` may replace, what ``report`` draws
MAX_RESULT_BYTES = 256 << 20


def json_document(path: Path, limit: int = MAX_RESULT_BYTES) -> Any:
    """``path``'s JSON value, or None where it cannot be read, is not JSON or is over ``limit``
    bytes: what a ``check_output_file`` ``replaceable`` predicate looks at."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size <= limit else None
    except (OSError, ValueError, RecursionError):
        return None


def is_result_json(kind: str) -> Callable[[Path], bool]:
    """A ``check_output_file`` ``replaceable`` predicate: the file is a JSON result of ``kind``
    (``quantkit.report.result_kind``: "compare", "bench", ...), as an earlier run wrote it."""
    def ours(path: Path) -> bool:
        from quantkit.report import result_kind

        return not path.is_symlink() and result_kind(json_document(path)) == kind
    return ours


# ------------------------------------------------------------------ writing a folder
def _files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _manifest_doc(staging: Path, command: str) -> dict[str, Any]:
    from quantkit import __version__

    files = {p.relative_to(staging).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
             for p in _files_below(staging) if p.name != MANIFEST}
    return {"tool": "quantkit", "version": __version__, "command": command, "files": files}


def _fix_modes(staging: Path) -> None:
    for p in staging.rglob("*"):
        _apply_umask(p, directory=p.is_dir())
    _apply_umask(staging, directory=True)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike[str], *, force: bool, inputs: Sequence[Any] = (),
               command: str = "quantkit") -> Iterator[Path]:
    """Yield a staging folder; on success its files become ``path``'s, with a manifest.

    ``path`` missing: the staging folder (beside it) is renamed into place in one step.
    ``path`` existing (empty, or an earlier run's with ``force``): staging lies inside it and
    each file is renamed into place atomically, the manifest last; earlier artifacts that this
    run did not write again are removed only if unchanged since quantkit wrote them. On any
    exception (Ctrl-C included) the staging folder is removed and ``path`` is as it was.
    """
    out = check_output_dir(path, force=force, inputs=inputs, command=command)
    created: list[Path] = []  # missing parents made here, removed again on failure
    for parent in reversed(out.parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as err:
                raise _os_error(err, parent, "create") from err
            _apply_umask(parent, directory=True)
            created.append(parent)
    in_place = out.is_dir()
    staging: Path | None = None
    committed = False
    try:  # from the staging folder's creation on: whatever ends the run (SIGTERM too) removes it
        try:
            staging = Path(tempfile.mkdtemp(prefix=".quantkit-staging-" if in_place else f".{out.name}.",
                                            suffix="" if in_place else ".partial",
                                            dir=out if in_place else out.parent))
        except OSError as err:
            raise _os_error(err, out, "write into") from err
        yield staging
        try:
            doc = _manifest_doc(staging, command)
            for p in _files_below(staging):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            if in_place:
                _commit_in_place(staging, out, doc)
            else:
                (staging / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
                _fix_modes(staging)
                try:
                    os.replace(staging, out)
                except OSError as err:
                    if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and out.exists():  # made by another run meanwhile
                        raise OutputError(f"output folder {str(out)!r} was filled by another process while this run "
                                          "worked; nothing of this run was written",
                                          hint="run again with another -o (or --force to replace that run's "
                                               "artifacts)") from err
                    raise
                _fsync_dir(out.parent)
        except OSError as err:
            raise _os_error(err, out, "write") from err
        committed = True
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back until the block is done (then delivered to the
    handlers there were before): a folder written in place is moved in file by file, and a
    Ctrl-C between two renames would leave a new model beside an old cache. In the main thread
    only (Python runs signal handlers there); elsewhere, as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    caught: list[int] = []
    before = {}
    for sig in wanted:
        if signal.getsignal(sig) is None:  # a handler set outside Python: it could not be put back
            continue
        with contextlib.suppress(ValueError, OSError):
            before[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _commit_in_place(staging: Path, out: Path, doc: dict[str, Any]) -> None:
    old = read_manifest(out)
    names = list(doc["files"])
    for name in names:  # refuse before moving anything: a user's file of the same name stays
        target = out / name
        if not inside(out, name):  # a symlinked folder inside -o: never written through
            raise OutputError(f"{str(target)!r} lies behind a symlink inside {str(out)!r}; quantkit does not write "
                              "through it", hint="remove the symlink or choose another path")
        if (target.exists() or target.is_symlink()) and not _ours(out, old, name):
            raise OutputExistsError(f"{str(target)!r} exists and was not written by quantkit (or was changed since)",
                                    hint="move it away or choose another -o; nothing was replaced")
    stale = [n for n in (old or {}).get("files", {}) if n not in doc["files"] and _ours(out, old, n)]
    _fix_modes(staging)
    with _signals_deferred():  # all of this run's files and its manifest, or (before it) the earlier run's
        for name in names:
            target = out / name
            if not target.parent.exists():
                target.parent.mkdir(parents=True)
                _apply_umask(target.parent, directory=True)
            os.replace(staging / name, target)
        _fsync_dir(out)
        write_json_atomic(out / MANIFEST, doc)
    if stale:  # (a demo's --keep-images folder a later run without it does not write, say)
        tops = sorted({Path(n).parts[0] + ("/" if len(Path(n).parts) > 1 else "") for n in stale})
        log.warning("%s: removed %d file(s) an earlier quantkit run wrote there and this one does not (%s)", out,
                    len(stale), ", ".join(tops[:5]) + (", ..." if len(tops) > 5 else ""))
    emptied: set[Path] = set()
    for name in stale:
        with contextlib.suppress(OSError):
            (out / name).unlink()
            emptied.update(p for p in (out / name).parents if p != out and out in p.parents)
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # the deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only where empty now: a folder holding anything else stays
