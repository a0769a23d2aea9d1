"""The docs name only flags that exist, and their links lead somewhere.

Every `--flag` in README.md and docs/*.md is looked up in the `--help` of the command the docs
name it for (the parsers are called in-process, so this takes a second or two). Which command
that is follows one convention, written out in docs/development.md ("The docs test"):

1. Command lines. Each line of a shell block (```bash, ```sh, ```console, ```shell), with its
   backslash continuation lines, is a command line; so is an inline code span whose first word
   is a program (`extract_features.py --verify`, `make fix ...`). A flag on a command line
   belongs to the program running at that point of the line: `torchrun --nnodes 4
   extract_features.py --out X` gives `--nnodes` to torchrun and `--out` to extract_features.py;
   after `|`, `&&`, `||` or `;` the next word is a program again; `$(...)` is left out; and the
   flags inside make's `FLAGS="..."` (and EXTRACT_FLAGS, TRAIN_FLAGS, STITCH_FLAGS) belong to
   quickfix-labels, which is what `make fix` passes them to.
2. Prose: anything else, text blocks (``` without a shell language) and python blocks included.
   A flag belongs to the command named in the nearest enclosing heading that names one of ours
   (`# Stage 1: `extract_features.py`` covers its `##` sections); where no enclosing heading
   names one, the flag must exist in at least one of our commands.
3. Other programs. A flag on the command line of a program that is not ours must be listed for
   that program in OTHER_PROGRAMS, and a listed flag the docs no longer use fails too (the list
   stays exact). A flag on the command line of a program that is neither fails: name the
   program there, or say which of ours the flag is for.

Only `--long` flags are checked (`-v`, `-m` are not).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Our commands: the name the docs use -> the module whose main(["--help"]) prints its help.
OURS = {
    "quickfix-labels": "pipeline.fix",
    "extract_features.py": "extract_features",
    "train_head.py": "train_head",
    "stitch_checkpoint.py": "stitch_checkpoint",
    "pipeline.demo": "pipeline.demo",  # what `make demo` runs (python -m pipeline.demo)
}
# `python -m MODULE` for our modules.
OUR_MODULES = {"pipeline": "quickfix-labels", "pipeline.fix": "quickfix-labels",
               "pipeline.demo": "pipeline.demo"}

# Programs that are not ours, with every flag the docs give them (checked against their use, so
# a flag added here must appear in the docs and a flag dropped from the docs must leave here).
OTHER_PROGRAMS: dict[str, set[str]] = {
    # PyTorch's launcher, in docs/scaling.md's torchrun and SLURM command lines
    "torchrun": {"--standalone", "--nproc-per-node", "--nnodes", "--rdzv-backend",
                 "--rdzv-endpoint", "--rdzv-id"},
    # SLURM's launcher, in docs/scaling.md
    "srun": {"--nodes", "--ntasks-per-node", "--gpus-per-node"},
    # the training script whose quick-fix mode docs/usage.md translates into quickfix-labels:
    # its own flags (the same command line then runs under quickfix-labels and is checked there)
    "train_imagenet_ec2.py": {"--resume", "--dataset", "--data-root", "--quick-fix-labels",
                              "--fix-epochs", "--lr", "--checkpoint-dir", "--batch-size"},
    # torchvision's reference training script, whose --model-ema writes the `model_ema` layout
    # that docs/checkpoints.md describes
    "references/classification/train.py": {"--model-ema"},
    # the fault campaign (bench/, documented in BENCHMARKS.md, not one of the four commands)
    "bench.campaign": {"--out", "--seed"},
    # tools the docs run without flags of their own (`make fix`, `pip install .`, ...)
    "make": set(), "pip": set(), "pytest": set(), "ruff": set(),
}
PYTHONS = re.compile(r"python(3(\.\d+)?)?$")
WRAPPERS = {"nohup", "time", "env", "sudo", "exec"}  # run the next word as the program
SEPARATORS = {"|", "||", "&&", ";"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}

# `--name`, underscores included (a misspelt `--data_root` must not slip through); not the
# arrows of the docs' diagrams (`--extract_features.py-->`) nor Markdown's `---`.
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9](?:[\w-]*[A-Za-z0-9])?(?![\w-]|\.\w)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
MAKE_FLAGS = re.compile(r"^[A-Z_]*FLAGS=")
COMMAND_IN_HEADING = re.compile(
    r"quickfix-labels|extract_features\.py|train_head\.py|stitch_checkpoint\.py|pipeline\.demo"
    r"|python -m pipeline(?![\w.])")


@dataclass(frozen=True)
class Use:
    """One flag the docs name, and whom for: `program` is ours, another program, None (no
    program named: any of ours will do), or "?name" (a program that is neither ours nor listed)."""

    file: str
    line: int
    flag: str
    program: str | None


# --- the commands' own flags ------------------------------------------------------------------

@functools.cache
def help_flags(command: str) -> frozenset[str]:
    """The flags in `command --help`, read from its options list (the lines indented by two
    spaces that start with a dash), so a flag named only in a description does not count."""
    import importlib

    module = importlib.import_module(OURS[command])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code in (0, None), f"{command} --help exited with {stop.value.code}"
    flags = set()
    for line in out.getvalue().splitlines():
        if re.match(r"^  -", line):
            flags.update(FLAG.findall(re.split(r"\s{2,}", line.strip())[0]))
    assert flags, f"{command} --help lists no flags:\n{out.getvalue()}"
    return frozenset(flags)


# --- reading the docs -------------------------------------------------------------------------

def program_of(word: str) -> str | None:
    """The program a word of a command line starts, or None if it starts none."""
    word = word.strip("'\"(")
    base = word.rsplit("/", 1)[-1]
    if base in OURS and base != "pipeline.demo":  # the demo runs as python -m pipeline.demo
        return base
    for name in (word, base):
        if name in OTHER_PROGRAMS:
            return name
    if word.endswith(".py"):  # a script: ours, listed, or unknown (by its path)
        return "?" + word
    return None


def command_line(text: str, first_line: int, file: str, context: str | None,
                 *, shell: bool) -> list[Use]:
    """The flags of one command line (a shell block's lines, or an inline span's text)."""
    uses: list[Use] = []
    program: str | None = None
    expect = True  # the next word is a program (start, after a separator or a wrapper)
    python = False  # the last program word was python: the next is -m MODULE or a script
    in_make_flags = False
    lines = text.split("\n")
    for offset, raw in enumerate(lines):
        line_no = first_line + offset
        line = re.sub(r"\$\([^()]*\)", "X", raw)
        comment = ""
        if shell:
            m = re.search(r"(^|\s)#", line)
            if m:
                line, comment = line[:m.start()], line[m.end():]
        words = line.split()
        i = 0
        while i < len(words):
            word = words[i]
            i += 1
            if word in SEPARATORS or word.endswith(";"):
                expect, python, program = True, False, None
                continue
            if MAKE_FLAGS.match(word) or in_make_flags:  # make fix FLAGS="..."
                uses += [Use(file, line_no, f, "quickfix-labels") for f in FLAG.findall(word)]
                value = word.split("=", 1)[1] if MAKE_FLAGS.match(word) else word
                quotes = value.count('"') + value.count("'")
                in_make_flags = quotes % 2 == 1 if MAKE_FLAGS.match(word) else quotes % 2 == 0
                continue
            if python:
                python = False
                if word == "-m" and i < len(words):
                    module = words[i]
                    i += 1
                    program = OUR_MODULES.get(module) or (
                        module if module in OTHER_PROGRAMS else "?python -m " + module)
                    continue
                if not word.startswith("-"):
                    program = program_of(word) or "?python " + word
                    continue
            started = program_of(word)
            if PYTHONS.match(word.rsplit("/", 1)[-1]):
                python, expect = True, False
                continue
            if expect and (word in WRAPPERS or re.match(r"^[A-Z_][A-Z0-9_]*=", word)):
                continue
            if started is not None:
                program, expect = started, False
                continue
            if expect:
                program, expect = "?" + word, False
                continue
            uses += [Use(file, line_no, f, program if program else context)
                     for f in FLAG.findall(word)]
        uses += [Use(file, line_no, f, context) for f in FLAG.findall(comment)]
        if shell and not raw.rstrip().endswith("\\"):  # the command line ends here
            program, expect, python, in_make_flags = None, True, False, False
    return uses


def prose(text: str, first_line: int, file: str, context: str | None) -> list[Use]:
    """A paragraph: its code spans that start with a program are command lines; every other
    flag belongs to the heading's command."""
    placed: list[tuple[int, Use]] = []  # (where in the paragraph, use): kept in text order
    rest = list(text)
    for m in SPAN.finditer(text):
        body = m.group(2)
        words = body.split()
        if words and (program_of(words[0]) or PYTHONS.match(words[0].rsplit("/", 1)[-1])):
            line = first_line + text.count("\n", 0, m.start(2))
            placed += [(m.start(), u)
                       for u in command_line(body, line, file, context, shell=False)]
            rest[m.start():m.end()] = re.sub(r"[^\n]", " ", m.group(0))
    rest_text = "".join(rest)
    for m in FLAG.finditer(rest_text):
        line = first_line + rest_text.count("\n", 0, m.start())
        placed.append((m.start(), Use(file, line, m.group(), context)))
    return [use for _, use in sorted(placed, key=lambda pair: pair[0])]


def heading_command(stack: list[tuple[int, str]]) -> str | None:
    for _, title in reversed(stack):
        m = COMMAND_IN_HEADING.search(title)
        if m:
            name = m.group()
            return "quickfix-labels" if name.startswith("python -m") else name
    return None


def read_doc(text: str, file: str) -> tuple[list[Use], list[tuple[int, str]]]:
    """Every flag use in one Markdown document, and its headings (level, title)."""
    uses: list[Use] = []
    headings: list[tuple[int, str]] = []
    stack: list[tuple[int, str]] = []
    lines = text.split("\n")
    paragraph: list[str] = []
    paragraph_start = 0

    def flush():
        nonlocal paragraph
        if paragraph:
            uses.extend(prose("\n".join(paragraph), paragraph_start, file,
                              heading_command(stack)))
        paragraph = []

    i = 0
    while i < len(lines):
        line, line_no = lines[i], i + 1
        fence = FENCE.match(line)
        if fence:
            flush()
            marker, lang = fence.group(1), fence.group(2).lower()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker):
                j += 1
            block = "\n".join(lines[i + 1:j])
            if lang in SHELL_LANGS:
                uses.extend(command_line(block, line_no + 1, file, heading_command(stack),
                                         shell=True))
            else:
                context = heading_command(stack)
                for k, block_line in enumerate(lines[i + 1:j]):
                    uses += [Use(file, line_no + 1 + k, f, context)
                             for f in FLAG.findall(block_line)]
            i = j + 1
            continue
        heading = HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading.group(2)))
            headings.append((level, heading.group(2)))
        elif not line.strip():
            flush()
        else:
            if not paragraph:
                paragraph_start = line_no
            paragraph.append(line)
        i += 1
    flush()
    return uses, headings


def problems(uses: list[Use]) -> list[str]:
    """One line per flag the docs name that its command does not have."""
    found = []
    for use in uses:
        where = f"{use.file}:{use.line}: {use.flag}"
        if use.program is None:
            if not any(use.flag in help_flags(c) for c in OURS):
                found.append(f"{where} is in no command's --help (the headings above it name "
                             "no command, so any of them would do)")
        elif use.program.startswith("?"):
            found.append(f"{where} is on the command line of {use.program[1:]!r}, which is "
                         "neither one of ours nor in OTHER_PROGRAMS")
        elif use.program in OURS:
            if use.flag not in help_flags(use.program):
                found.append(f"{where} is not in `{use.program} --help`")
        elif use.flag not in OTHER_PROGRAMS[use.program]:
            found.append(f"{where} is not listed for {use.program} in OTHER_PROGRAMS")
    return found


def all_uses() -> list[Use]:
    uses = []
    for path in DOCS:
        uses += read_doc(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))[0]
    return uses


# --- the tests --------------------------------------------------------------------------------

def test_every_flag_the_docs_name_exists():
    uses = all_uses()
    found = problems(uses)
    assert not found, (f"{len(found)} flag(s) named in the docs are missing from the "
                       "command they are named for:\n" + "\n".join(found))


def test_the_docs_name_flags_of_every_command():
    """A parser that finds nothing would pass the test above: it must find each command's
    flags, in the numbers the docs have."""
    uses = all_uses()
    per_program = {}
    for use in uses:
        per_program.setdefault(use.program, set()).add(use.flag)
    for command in ("quickfix-labels", "extract_features.py", "train_head.py",
                    "stitch_checkpoint.py"):
        assert len(per_program.get(command, ())) >= 5, (command, per_program.get(command))
    assert len(uses) > 200


def test_other_programs_list_only_flags_the_docs_use():
    used: dict[str, set[str]] = {}
    for use in all_uses():
        if use.program in OTHER_PROGRAMS:
            used.setdefault(use.program, set()).add(use.flag)
    stale = {p: sorted(f - used.get(p, set())) for p, f in OTHER_PROGRAMS.items()
             if f - used.get(p, set())}
    assert not stale, f"OTHER_PROGRAMS lists flags the docs no longer use: {stale}"


SAMPLE = """\
# Stage 1: `extract_features.py`

Prose under stage 1: `--verify`, and `train_head.py --stream` names its command.

```bash
torchrun --nnodes 2 train_head.py --features f.zarr \\
    --out head.pt  # a comment's --float32 is prose
make fix FLAGS="--trust-checkpoint --force" && quickfix-labels --no-verify-data
mystery --z-flag
```

## A section of stage 1

Still stage 1: `--made-up-stage1-flag`.

# Nothing named here

Any command's: `--aux-heads`; `mystery --x-flag`; `python other.py --y-flag`.
A diagram's arrow is no flag: a --extract_features.py--> b; `--data_root` is one.

```
a text block: --float32
```
"""


def test_the_convention_on_a_sample():
    """The rules of the module docstring, one by one, and the message when a flag is missing."""
    uses, headings = read_doc(SAMPLE, "sample.md")
    got = [(u.line, u.flag, u.program) for u in uses]
    assert got == [
        (3, "--verify", "extract_features.py"),
        (3, "--stream", "train_head.py"),
        (6, "--nnodes", "torchrun"),
        (6, "--features", "train_head.py"),
        (7, "--out", "train_head.py"),
        (7, "--float32", "extract_features.py"),
        (8, "--trust-checkpoint", "quickfix-labels"),
        (8, "--force", "quickfix-labels"),
        (8, "--no-verify-data", "quickfix-labels"),
        (9, "--z-flag", "?mystery"),
        (14, "--made-up-stage1-flag", "extract_features.py"),
        (18, "--aux-heads", None),
        (18, "--x-flag", None),  # a span is a command line only when it starts with a program
        (18, "--y-flag", "?other.py"),
        (19, "--data_root", None),
        (22, "--float32", None),
    ]
    assert [level for level, _ in headings] == [1, 2, 1]
    found = problems(uses)
    assert found == [
        "sample.md:9: --z-flag is on the command line of 'mystery', which is neither one of "
        "ours nor in OTHER_PROGRAMS",
        "sample.md:14: --made-up-stage1-flag is not in `extract_features.py --help`",
        "sample.md:18: --x-flag is in no command's --help (the headings above it name no "
        "command, so any of them would do)",
        "sample.md:18: --y-flag is on the command line of 'other.py', which is neither one of "
        "ours nor in OTHER_PROGRAMS",
        "sample.md:19: --data_root is in no command's --help (the headings above it name no "
        "command, so any of them would do)",
    ]


def test_help_lists_boolean_negations():
    """`--no-X` forms come from BooleanOptionalAction and show in --help beside `--X`."""
    assert {"--verify-data", "--no-verify-data"} <= help_flags("quickfix-labels")
    assert {"--ema", "--no-ema"} <= help_flags("extract_features.py")


# --- links ------------------------------------------------------------------------------------

def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_lead_somewhere():
    """Every relative link in the docs names an existing file, and its #anchor a heading."""
    anchors: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in anchors:
            _, headings = read_doc(path.read_text(encoding="utf-8"), str(path))
            anchors[path] = {slug(title) for _, title in headings}
        return anchors[path]

    broken = []
    for doc in [*DOCS, ROOT / "BENCHMARKS.md"]:
        text = doc.read_text(encoding="utf-8")
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            line = text.count("\n", 0, m.start()) + 1
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}:{line}: {target}"
            if not path.exists():
                broken.append(f"{where}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors_of(path):
                broken.append(f"{where}: no heading with that anchor in {path.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)
