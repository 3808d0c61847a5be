"""The Makefile's engine directory (make -n: what `make engine` would run, nothing built)."""
import os
import shutil
import subprocess

import pytest

from sparvar.engine import parse_query_tile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_target_command(target: str = "engine", **variables) -> str:
    """The sparvar CLI command `make -n <target> VAR=value ...` would run."""
    args = ["make", "-n", "-C", ROOT, target] + [f"{k}={v}" for k, v in variables.items()]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if "sparvar.cli" in line)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the README's commands use it)")
@pytest.mark.parametrize("tile", ["8x8", "08x8", "008x08", "4x16", "16x08"])
def test_one_query_tile_however_spelled_is_one_engine_directory(tile):
    rows, cols = parse_query_tile(tile)
    command = make_target_command(MODEL="infinity-tiny", CSLA_QUERY_TILE=tile)
    # the CLI gets the text as given (it parses and checks it); the directory gets the spec's one spelling
    assert f"--csla-query-tile {tile} " in command
    assert command.endswith(f"--engine-dir engines/infinity-tiny-sparvar-onnxruntime-tiles{rows}x{cols}")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the README's commands use it)")
def test_no_query_tile_leaves_the_directory_and_the_command_without_one():
    command = make_target_command(MODEL="infinity-tiny")
    assert "--csla-query-tile" not in command
    assert command.endswith("--engine-dir engines/infinity-tiny-sparvar-onnxruntime")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the README's commands use it)")
def test_a_resolution_gets_its_own_engine_directory_and_generate_checks_it():
    """`make engine RESOLUTION=512` had built into the 256 engine's directory, and `make generate RESOLUTION=256`
    then ran the 512 engine without a word: the directory names the resolution, and generate passes it to the CLI,
    which refuses an engine built for another."""
    build = make_target_command(MODEL="infinity-tiny", RESOLUTION=512)
    assert "--resolution 512 " in build and build.endswith("--engine-dir engines/infinity-tiny-512-sparvar-onnxruntime")
    run = make_target_command("generate", MODEL="infinity-tiny", RESOLUTION=512)
    assert "--engine engines/infinity-tiny-512-sparvar-onnxruntime --resolution 512 " in run
    assert "--resolution" not in make_target_command("generate", MODEL="infinity-tiny")
