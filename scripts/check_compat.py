"""Do fedtune's exports and adapters load right in older transformers and peft?

Builds, with fedtune's own libraries, an adapter on the built-in model (or takes
--adapter), its merged export (``fedtune export``'s code), and reference logits of both
on one chat prompt. Then, for each --versions pair, installs that transformers and peft
into a throwaway venv (torch from a local wheel, the rest from the package index), loads
the export with ``AutoModelForCausalLM``/``AutoTokenizer`` and the adapter with
``PeftModel.from_pretrained`` onto fedtune's converted base folder, and prints the
maximum absolute logit difference against fedtune's. It also loads a copy of the
export with the transformers 5 keys only (what fedtune wrote before), to show what
the 4.x keys fix.

    nice -n 10 .venv/bin/python scripts/check_compat.py --versions 4.53.3:0.17.1 4.45.2:0.13.2

Runs minutes per pair (mostly pip); the venv is kept under --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Define the word 'otter' (noun)."
TORCH_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.1[0-3]*.whl"))

# Runs inside the old venv: written to a file there, given the work folder as argv[1].
CHILD = textwrap.dedent('''
    import json, sys, warnings
    from pathlib import Path
    import torch, transformers, peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    warnings.filterwarnings("ignore")
    work = Path(sys.argv[1])
    ref = torch.load(work / "reference.pt")
    ids = torch.tensor([ref["ids"]])
    out = {"transformers": transformers.__version__, "peft": peft.__version__}

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def diff(model, want):
        with torch.no_grad():
            return float((model(input_ids=ids).logits[0] - want).abs().max())

    def error(err):
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

    for name in ("export", "export-5x-keys-only"):
        try:
            model = load(work / name)
            out[name] = {"max-abs-diff": diff(model, ref["export"]),
                         "rope-theta": getattr(model.config, "rope_theta", None)}
        except Exception as err:  # report and go on: a failure is a result here
            out[name] = {"error": error(err)}
        try:
            tok = AutoTokenizer.from_pretrained(work / name)
            text = tok.apply_chat_template(ref["messages"], tokenize=False,
                                           add_generation_prompt=True)
            out[name].update({"tokenizer": type(tok).__name__,
                              "same-prompt-text": text == ref["text"],
                              "same-token-ids": tok(text, add_special_tokens=False)["input_ids"] == ref["ids"]})
        except Exception as err:
            out[name]["tokenizer-error"] = error(err)
    try:
        from peft import PeftModel
        model = PeftModel.from_pretrained(load(ref["base"]), work / "adapter").eval()
        out["adapter"] = {"max-abs-diff": diff(model, ref["adapter"]),
                          "base-rope-theta": getattr(model.base_model.model.config, "rope_theta", None)}
    except Exception as err:
        out["adapter"] = {"error": error(err)}
    print("RESULT " + json.dumps(out))
''')


def build_reference(work: Path, adapter: str | None) -> None:
    """Adapter, export, an export with the 5.x keys only, and fedtune's logits."""
    import torch

    from common.adapters import attach_adapter, find_adapter
    from common.config import BUILTIN_MODEL, RunConfig
    from common.export import export_merged
    from common.model import adapter_state, get_model, load_tokenizer, resolve_model_path
    from common.runtime import setup_process

    setup_process(os.cpu_count() or 1)
    for name in ("adapter", "export", "export-5x-keys-only"):
        shutil.rmtree(work / name, ignore_errors=True)
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    base_dir = resolve_model_path(BUILTIN_MODEL)
    if adapter:
        from transformers import AutoModelForCausalLM

        source = find_adapter(adapter)
        shutil.copytree(source.path, work / "adapter")
        model = attach_adapter(AutoModelForCausalLM.from_pretrained(base_dir),
                               work / "adapter", model_name=BUILTIN_MODEL)
    else:  # LoRA B != 0, so the adapter really changes the logits
        model = get_model(RunConfig(lora_dropout=0.0))
        gen = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in adapter_state(model).items()}
        from common.model import set_adapter_state

        set_adapter_state(model, state)
        model.save_pretrained(work / "adapter")
    model.eval()
    messages = [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        adapter_logits = model(input_ids=torch.tensor([ids])).logits[0]
    export_merged(model, tokenizer, work / "export")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(work / "export").eval()
    with torch.no_grad():
        export_logits = merged(input_ids=torch.tensor([ids])).logits[0]
    print(f"fedtune: export vs adapter logits in this venv: max abs diff "
          f"{float((export_logits - adapter_logits).abs().max()):.3g}")
    strip_4x_keys(work / "export", work / "export-5x-keys-only")
    torch.save({"ids": ids, "text": text, "messages": messages, "base": base_dir,
                "adapter": adapter_logits, "export": export_logits}, work / "reference.pt")


def strip_4x_keys(src: Path, dst: Path) -> None:
    """A copy of an export as transformers 5 writes it, without the 4.x keys."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype"):
        config.pop(key, None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "TokenizersBackend"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))


def check(work: Path, transformers: str, peft: str) -> dict:
    venv = work / "venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check", "install"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(pip + ([str(TORCH_WHEELS[-1])] if TORCH_WHEELS else ["torch"]), check=True)
    subprocess.run(pip + [f"transformers=={transformers}", f"peft=={peft}"], check=True)
    (work / "child.py").write_text(CHILD)
    result = subprocess.run([str(python), str(work / "child.py"), str(work)],
                            capture_output=True, text=True)
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"transformers": transformers, "peft": peft,
                "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("RESULT "):])


def summary(result: dict) -> str:
    def cell(entry: dict | None) -> str:
        if not entry:
            return "-"
        if "error" in entry:
            return "error: " + entry["error"]
        extra = [f"rope_theta {entry['rope-theta']}"] if "rope-theta" in entry else []
        extra += [entry["tokenizer"]] if "tokenizer" in entry else []
        extra += [f"tokenizer error: {entry['tokenizer-error']}"] if "tokenizer-error" in entry else []
        if "same-token-ids" in entry and not (entry["same-token-ids"] and entry["same-prompt-text"]):
            extra.append("OTHER chat-template tokens")
        return f"max abs diff {entry['max-abs-diff']:.3g} ({', '.join(extra) or 'ok'})"

    if "error" in result:
        return f"transformers {result['transformers']}, peft {result['peft']}: {result['error']}"
    return "\n".join([f"transformers {result['transformers']}, peft {result['peft']}:",
                      f"  export:                  {cell(result.get('export'))}",
                      f"  adapter (PeftModel):     {cell(result.get('adapter'))}",
                      f"  export, 5.x keys only:   {cell(result.get('export-5x-keys-only'))}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=["4.53.3:0.17.1"],
                        metavar="TRANSFORMERS:PEFT", help="pairs to check (default: 4.53.3:0.17.1)")
    parser.add_argument("--adapter", default=None,
                        help="a run folder or PEFT folder on the built-in model (default: a "
                             "seeded random adapter)")
    parser.add_argument("--work", default="/tmp/fedtune-compat", help="work folder (kept)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the adapter, export and logits of an earlier call in --work")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and (work / "reference.pt").exists()):
        build_reference(work, args.adapter)
    for pair in args.versions:
        transformers, _, peft = pair.partition(":")
        print(summary(check(work, transformers, peft)), flush=True)


if __name__ == "__main__":
    main()
