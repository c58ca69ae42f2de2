"""One dtype spelling for every command: auto|fp32|bf16|fp16, torch's names also read."""

from __future__ import annotations

import pytest
import torch

from keyseg import cli

# Each command's arguments up to --dtype (positionals it requires).
COMMANDS = {
    "segment": ["segment", "a.png", "q"],
    "chat": ["chat", "a.png"],
    "eval": ["eval", "--dataset", "shapes:test"],
    "export": ["export", "src", "dst"],
    "convert lisa": ["convert", "lisa", "src", "dst"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("spelling", "canonical"), [
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("fp32", "fp32"), ("float32", "fp32"),
    ("fp16", "fp16"), ("float16", "fp16"), ("auto", "auto"),
])
def test_every_command_reads_every_spelling(command, spelling, canonical):
    args = cli.build_parser().parse_args([*COMMANDS[command], "--dtype", spelling])
    assert args.dtype == canonical


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_defaults_to_auto_and_refuses_unknown_dtypes(command, capsys):
    assert cli.build_parser().parse_args(COMMANDS[command]).dtype == "auto"
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([*COMMANDS[command], "--dtype", "fp8"])
    assert info.value.code == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


def test_names_map_to_torch_dtypes_wherever_they_are_resolved():
    from keyseg.commands.convert import _dtype as convert_dtype
    from keyseg.pipeline import resolve_dtype
    from keyseg.runtime import resolve_dtype as eval_dtype  # what keyseg eval and train use

    cpu = torch.device("cpu")
    for name, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                           ("fp16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert resolve_dtype(name, cpu) is expected
        assert eval_dtype(name, cpu) is expected
        assert convert_dtype(name) is expected
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype(None, cpu) is torch.float32
    assert eval_dtype("auto", cpu) is torch.float32 and convert_dtype("auto") is None
