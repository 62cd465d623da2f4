"""The README's bring-your-own example (model, data, reward module), run as a user would, in its own folder.

The files and commands are read from the README between `<!-- byo-example -->` markers, so the README cannot
drift from what works. It runs as a subprocess: the reward module must be importable in Ray workers started
from the example's folder, exactly as the README says.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> tuple[dict[str, str], list[str]]:
    """({file name: content}, [command lines]) of the README's worked example."""
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- byo-example -->")[1].split("<!-- /byo-example -->")[0]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = rest
        elif lang == "bash":
            commands += [line for line in body.splitlines() if line.strip()]
    return files, commands


def test_readme_example_parses():
    files, commands = readme_example()
    assert set(files) == {"my_rewards.py", "sums.jsonl"} and len(commands) == 2
    assert all("rlhf-ray " in c for c in commands)


def test_readme_byo_example_runs(tmp_path):
    files, commands = readme_example()
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    outputs = []
    for line in commands:
        words = shlex.split(line)
        extra_path = ""
        if words[0].startswith("PYTHONPATH="):
            extra_path = str(tmp_path / words.pop(0).split("=", 1)[1])
        assert words[0] == "rlhf-ray"
        run_env = env | {"PYTHONPATH": os.pathsep.join(filter(None, [extra_path, str(ROOT), env.get("PYTHONPATH")])),
                         "WANDB_MODE": "offline"}
        done = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *words[1:]], cwd=tmp_path, env=run_env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    model = tmp_path / "runs/sums/checkpoints/step_000001/policy"
    assert f"model: runs/sums/checkpoints/step_000001/policy" in outputs[-1]
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    assert not [p.name for p in model.iterdir() if p.is_dir()]  # no optimizer or state folders in the model folder
    assert (model.parent / "learner_state" / "policy" / "optimizer.json").is_file()
    assert "step 1/1" in outputs[-1] and (tmp_path / "runs/sums/workers.log").stat().st_size > 0
