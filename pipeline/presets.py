"""Datasets whose correct class order is known: `--dataset NAME` instead of a class-order file.

A preset is one table shipped in `pipeline/datasets/NAME.tsv`, one class per line in the
dataset's standard index order:

    INDEX<TAB>CLASS_ID<TAB>HUMAN NAME

`CLASS_ID` is what the class folders are called (ImageNet: the WordNet id, n01440764) and the
human name is what the fixed checkpoint's `id_to_class` carries beside it, as
`imagenet_class_index.json` does (`[["n01440764", "tench"], ...]`). Lines starting with `#` are
comments (say where the table comes from). Adding a dataset is adding its table and one line to
`PRESETS`. Nothing is downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, ref

TABLES = Path(__file__).resolve().parent / "datasets"


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    table: str  # file name under pipeline/datasets/

    @functools.cached_property
    def _rows(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return read_table(TABLES / self.table)

    @property
    def classes(self) -> list[str]:
        """The class ids (folder names) in the standard index order."""
        return list(self._rows[0])

    @property
    def names(self) -> list[str]:
        """The human-readable name of each class, in the same order."""
        return list(self._rows[1])


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("imagenet1k", "ImageNet-1k (ILSVRC 2012), 1000 classes in the standard index "
               "order", "imagenet1k.tsv"),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise DataError(f"{ref('extract.dataset', name)}: not a known dataset (known: "
                        f"{', '.join(sorted(PRESETS))}); for another dataset give its order "
                        f"with {ref('extract.class_order', 'FILE')}") from None


def read_table(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class ids, names) of a preset table; its indices must run 0, 1, ... in order."""
    ids: list[str] = []
    names: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] != str(len(ids)) or not parts[1]:
            raise ValueError(f"{path}:{number}: expected '{len(ids)}<TAB>id<TAB>name'")
        ids.append(parts[1])
        names.append(parts[2])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: a class id is listed twice")
    return tuple(ids), tuple(names)


def check_folders(preset: Preset, folders: Mapping[str, Sequence[str]]) -> None:
    """Every split's class folders must be exactly the preset's classes: what is missing, extra
    or misnamed is named, all in one error line. `folders`: split name -> its class folders."""
    want = set(preset.classes)
    by_name = {n.casefold(): c for c, n in zip(preset.classes, preset.names, strict=True)}
    by_id = {c.casefold(): c for c in preset.classes}
    problems = []
    for split, names in folders.items():
        have = set(names)
        missing = sorted(want - have)
        extra = sorted(have - want)
        misnamed = {}
        for folder in extra:  # "N01440764", "n01440764 ", "tench": a folder for a missing class
            guess = by_id.get(folder.strip().casefold()) or by_name.get(
                folder.strip().replace("_", " ").casefold())
            if guess in missing:
                misnamed[folder] = guess
        missing = [c for c in missing if c not in misnamed.values()]
        extra = [f for f in extra if f not in misnamed]
        if misnamed:
            problems.append(f"{split}/ has misnamed folders: " + ", ".join(
                f"{f!r} should be {c}" for f, c in list(misnamed.items())[:5])
                + (" ..." if len(misnamed) > 5 else ""))
        if not names:  # ImageNet's test/ is flat: no labels
            problems.append(f"{split}/ has no class folders (leave it out: {ref('extract.splits')} "
                            f"{' '.join(s for s in folders if folders[s])})")
        elif missing:
            problems.append(f"{split}/ lacks {len(missing)} of the {len(want)} class folders "
                            f"({_some(missing)})")
        if extra:
            problems.append(f"{split}/ has {len(extra)} folder(s) that are not {preset.name} "
                            f"classes ({_some(extra)})")
    if problems:
        raise DataError(f"{ref('extract.dataset', preset.name)}: the class folders do not match "
                        f"its {len(want)} classes: {'; '.join(problems)}")


def _some(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
