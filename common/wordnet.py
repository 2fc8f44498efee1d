"""The built-in dataset: WordNet 3.0 definitions as instruction pairs, one lexicographer
category per record (the natural partition of the built-in federation and the tasks of
meta-learning's k-shot test). Read from Debian's ``wordnet-base`` files, no download."""

from __future__ import annotations

from pathlib import Path

from common.config import BUILTIN_DATASET

WORDNET_DIR = Path("/usr/share/wordnet")
# WordNet 3.0's lexicographer files, indexed by the lex_filenum field of data.* lines
# (the 'lexnames' file, which Debian's wordnet-base does not ship).
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact "
    "noun.attribute noun.body noun.cognition noun.communication noun.event "
    "noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time "
    "verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_records(wordnet_dir: Path = WORDNET_DIR) -> list[dict[str, str]]:
    """WordNet definitions as instruction pairs, each with its lexicographer category."""
    files = [wordnet_dir / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.exists() for f in files):
        raise FileNotFoundError(
            f"built-in dataset '{BUILTIN_DATASET}' needs WordNet in {wordnet_dir}: run "
            "`apt-get install wordnet-base` (or pass --dataset FILE)"
        )
    records = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                lexname = WORDNET_LEXNAMES[int(fields[1])]
                word = fields[4].replace("_", " ")
                word = word.split("(")[0]  # adjective markers like 'galore(ip)'
                definition = gloss.split('; "')[0].strip().rstrip(";").strip()
                if not definition:
                    continue
                pos = _POS_NAMES[fields[2]]
                records.append({
                    "instruction": f"Define the word '{word}' ({pos}).",
                    "input": "",
                    "output": definition[0].upper() + definition[1:] + ".",
                    "category": lexname,
                })
    return records
