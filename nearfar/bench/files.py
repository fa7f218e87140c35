"""The files of ``nearfar bench``: atomic writes, and the checked loading of ``results.json`` and
``results.partial.json``.

Every file the bench writes goes through ``write_atomic``: a kill, a full disk or a failing ``bench report`` leaves
the previous file or the new one, never a truncated one, and ``--resume`` can always read what is there. A file
that is truncated or edited by hand anyway gives one ``BenchFileError`` naming the file and the field at fault,
rather than a ``KeyError`` deep inside the report.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class BenchFileError(ValueError):
    """A bench folder or results file that cannot be used as it is (the CLI prints it as a one-line error)."""


def warn(message: str) -> None:
    # stderr, like the progress bars: a CLI user sees one plain line, not a Python warning with its source line
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through a temp file in the same folder, then ``os.replace``;
    the temp file is removed when the write fails."""
    path = Path(path)
    # a unique name: two writers of the same file (a save racing a report) never share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x", not mkstemp: the file gets the umask's mode, as a plain write would
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a crash
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:  # name the file meant, not the temp file or none
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


# ------------------------------------------------------------------------------------------------ the schema
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: kind -> (check, what the error says the field must be)
_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "size": (lambda v: _is_int(v) or isinstance(v, str), "an integer or a string such as '14x14'"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "bins": (lambda v: isinstance(v, dict) and all(x is None or _is_number(x) for x in v.values()),
             "an object of numbers by bin"),
    "times": (lambda v: isinstance(v, dict) and bool(v) and all(
        isinstance(x, list) and x and all(_is_number(t) and t > 0 for t in x) for x in v.values()),
        "an object of lists of positive times by method"),
    "any": (lambda v: True, "present"),
}

#: the fields the report, the summary and --resume read, by record; "?" marks an optional field (missing or null),
#: other fields may be there too (rows carry more than the report shows)
_SPEED_ROW = {"mechanism": "text", "pattern": "text", "phase": "text", "size": "size", "tokens": "int",
              "ratio": "number", "dims": "text?", "peak_mib": "number?", "dense_peak_mib": "number?",
              "saved_mib": "number?", "dense_saved_mib": "number?", "peer": "text?"}
_PEER_ROW = {"ms": "number", "dense_ms": "number"}
_GATE = {"mechanism": "text", "pattern": "text", "passed": "bool", "detail": "text", "dims": "text?"}
_CROSSOVER = {"mechanism": "text", "pattern": "text", "phase": "text", "time_crossover": "any",
              "memory_crossover": "any"}
_SKIPPED = {"mechanism": "text", "why": "text", "pattern": "text?"}
_TASK = {"pattern": "text", "metric": "text", "bin_names": "texts", "description": "text", "kind": "text?"}
_QUALITY_ROW = {"name": "text", "seed": "int", "overall": "number", "per_bin": "bins", "seconds": "number",
                "final_loss": "number?", "threads": "int?", "jobs": "int?"}
_COMPARE_ROW = {"pattern": "text", "dims": "text", "size": "size", "tokens": "int", "phase": "text", "rounds": "int",
                "times_ms": "times"}
_TOP = {"env": "object?", "command": "text?", "settings": "object?", "interrupted": "bool?", "speed": "object?",
        "quality": "object?", "compare": "object?"}


#: stands for a missing field in the error message
_MISSING = object()


def _typename(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _check(record: object, spec: dict[str, str], where: str, fail: Callable[[str, str, object], NoReturn]) -> None:
    if not isinstance(record, dict):
        fail(where, "an object", record)
    for key, kind in spec.items():
        optional = kind.endswith("?")
        check, what = _KINDS[kind.rstrip("?")]
        if optional and record.get(key) is None:
            continue
        if key not in record or not check(record[key]):
            fail(f"{where}.{key}" if where else key, what + (" or null" if optional else ""),
                 record.get(key, _MISSING))


def _records(container: dict, key: str, spec: dict[str, str], where: str, fail: Callable[[str, str, object], NoReturn],
             required: bool = False) -> list:
    rows = container.get(key)
    if rows is None and not required:
        return []
    field = f"{where}.{key}" if where else key
    if not isinstance(rows, list):
        fail(field, "a list of rows", rows if key in container else _MISSING)
    for i, row in enumerate(rows):
        _check(row, spec, f"{field}[{i}]", fail)
    return rows


def check_results(data: object, source: str) -> dict:
    """``data`` (a loaded results file) if it has every field the report and ``--resume`` read, with the types
    they need; else a ``BenchFileError`` naming ``source`` and the first bad field."""

    def fail(field: str, what: str, got: object) -> NoReturn:
        got_text = "missing" if got is _MISSING else f"got {_typename(got)}"
        if field:
            raise BenchFileError(f"{source}: field '{field}' must be {what}, {got_text}")
        raise BenchFileError(f"{source}: must hold a JSON object of results, {got_text}")

    _check(data, _TOP, "", fail)
    assert isinstance(data, dict)  # _check failed otherwise
    commands = data.get("commands")
    if commands is not None and not (isinstance(commands, list)
                                     and all(c is None or isinstance(c, str) for c in commands)):
        fail("commands", "a list of strings", commands)
    _records(data, "resumed_with_changes", {"setting": "text", "before": "any", "after": "any"}, "", fail)
    speed = data.get("speed")
    if speed is not None:
        for i, row in enumerate(_records(speed, "rows", _SPEED_ROW, "speed", fail)):
            if row.get("peer"):  # the peers' table prints their times
                _check(row, _PEER_ROW, f"speed.rows[{i}]", fail)
        _records(speed, "gates", _GATE, "speed", fail)
        _records(speed, "crossovers", _CROSSOVER, "speed", fail)
        _records(speed, "skipped", _SKIPPED, "speed", fail)
        if speed.get("config") is not None and not isinstance(speed["config"], dict):
            fail("speed.config", "an object or null", speed["config"])
    comparison = data.get("compare")
    if comparison is not None:
        for i, row in enumerate(_records(comparison, "rows", _COMPARE_ROW, "compare", fail)):
            counts = {len(v) for v in row["times_ms"].values()}
            if counts != {row["rounds"]} or "dense" not in row["times_ms"]:
                fail(f"compare.rows[{i}].times_ms", f"{row['rounds']} times (rounds) for every method, dense "
                     f"included", row["times_ms"])
        _records(comparison, "gates", _GATE, "compare", fail)
        _records(comparison, "skipped", _SKIPPED, "compare", fail)
    for name, entry in (data.get("quality") or {}).items():
        where = f"quality.{name}"
        _check(entry, {"task": "object"}, where, fail)
        _check(entry["task"], _TASK, f"{where}.task", fail)
        _records(entry, "rows", _QUALITY_ROW, where, fail, required=True)
        _records(entry, "skipped", _SKIPPED, where, fail)
    return data


def load_results(path: str | Path) -> dict:
    """Read and check a results file (``results.json`` or ``results.partial.json``): a ``BenchFileError`` naming
    the file if it cannot be read, is not JSON (e.g. truncated) or lacks a field the report needs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BenchFileError(f"{path}: cannot be read ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                             "truncated or edited by hand?") from None
    return check_results(data, str(path))


def check_out_dir(out: Path) -> None:
    """Create the bench's folder ``out``, or a ``BenchFileError`` saying why it cannot be used."""
    if out.exists() and not out.is_dir():
        raise BenchFileError(f"--out {out} is a file, not a folder: give a folder to write the report in")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchFileError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BenchFileError(f"--out {out}: the folder is not writable")

