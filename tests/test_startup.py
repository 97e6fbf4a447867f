"""`densenet --help`, every `densenet COMMAND --help` and `densenet models` import no torch, and
`import densenet` loads torch._dynamo only when something is compiled. Checked in fresh
interpreters (sys.modules of this one is full of torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from densenet import efficient, models
from densenet.cli import COMMAND_MODULES

HEAVY = ("torch", "torchvision", "numpy", "PIL", "matplotlib", "onnxruntime", "yaml")


def loaded_after(code: str) -> set[str]:
    """Top-level packages of HEAVY that a fresh interpreter has loaded after running ``code``;
    ``code`` may print only to stderr (stdout carries the answer)."""
    probe = (
        "import sys, json, contextlib, io\n"
        "with contextlib.redirect_stdout(sys.stderr):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def run_cli(argv: list[str]) -> str:
    return f"from densenet.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize("argv", [["--help"], []] + [[c, "--help"] for c in COMMAND_MODULES])
def test_help_imports_nothing_heavy(argv):
    assert loaded_after(run_cli(argv)) == set()


# The weights registry (densenet.hub.registry) is plain data too: listing it needs no torch.
@pytest.mark.parametrize(
    "argv", [["models"], ["models", "--json", "densenet_bc*"], ["models", "--weights"]]
)
def test_models_table_imports_no_torch(argv):
    assert loaded_after(run_cli(argv)) == set()


def test_import_densenet_is_light_and_dynamo_waits_for_compile():
    assert loaded_after("import densenet") == set()
    code = (
        "import sys, torch, densenet\n"
        "model = densenet.create_model('densenet_bc16_k12', memory_efficient=True)\n"
        "model(torch.randn(2, 3, 32, 32)).sum().backward()\n"  # the memory-efficient blocks ran
        "densenet.DenseNet, densenet.optimize_for_inference, densenet.load_pretrained\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    )
    assert "torch" in loaded_after(code)


def test_blocks_stay_out_of_compiled_graphs_as_with_compiler_disable():
    # The lazily applied torch.compiler.disable must leave the same graph as the decorator did:
    # the blocks run eagerly, the rest is traced (a block traced in would add ~150 ops).
    import torch._dynamo

    x = torch.randn(2, 3, 8, 8)

    def traced_ops(block_function) -> int:
        original = models.dense_block_memory_efficient
        models.dense_block_memory_efficient = block_function
        try:
            model = models.DenseNet(4, (2, 2), 8, stem="cifar", num_classes=3)
            model.set_grad_checkpointing(True)
            torch._dynamo.reset()
            return torch._dynamo.explain(model)(x).op_count
        finally:
            models.dense_block_memory_efficient = original

    plain = efficient.dense_block_memory_efficient.__wrapped__
    assert traced_ops(efficient.dense_block_memory_efficient) == traced_ops(
        torch.compiler.disable(plain)
    )
    assert traced_ops(plain) > traced_ops(efficient.dense_block_memory_efficient)


def test_option_constants_match_the_modules_they_mirror():
    from densenet import export
    from densenet.cli import export as export_cli

    assert export_cli.SUFFIXES == export.SUFFIXES


def test_lazy_names_and_submodules_still_resolve():
    import densenet

    assert sorted(densenet.__all__) == sorted(densenet._EXPORTS)
    for name in densenet.__all__:
        assert getattr(densenet, name) is not None and name in dir(densenet)
    assert densenet.factory.create_model is densenet.create_model  # submodules as attributes
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        densenet.nothing  # noqa: B018
