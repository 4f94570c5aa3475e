"""The world-trained backbones, built once per machine and cached like the tiny ones.

``${paths.world_backbones}/`` (default ``${paths.cache_dir}/world_backbones``) holds what has been
trained on the world: ``imagebind/imagebind_tiny.pth`` (``nextgpt.world.imagebind``), in the
format and loading path of ``imagebind_huge.pth``; ``llm/``, the tiny Llama pre-trained further on
world turns whose answers depend on the request (``nextgpt.world.llm``); ``sd/``, ``audioldm/`` and
``t2v/``, the tiny Stable Diffusion, AudioLDM and text-to-video pipelines trained on world images,
tones and clips (``nextgpt.world.decoders``), all saved with ``save_pretrained``; and
``report.json`` with each backbone's quality line. The LLM and the decoders start from the tiny
random ones in ``${paths.backbones}``; ``model=world`` reads them all. The build is deterministic
for its settings, versioned (``WORLD_BUILD_VERSION``) and atomic (a temporary folder renamed
into place; concurrent builders take turns).

    python -m nextgpt.world.build --out .cache/world_backbones [--backbones .cache/tiny_backbones] [--small] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nextgpt.atomic import building, exclusive, install
from nextgpt.encoders.imagebind import ImageBindModel
from nextgpt.tiny import IMAGEBIND_FILE, build_all, imagebind_layout_hash, tiny_imagebind_config
from nextgpt.world.decoders import WorldDecodersSettings, train_world_decoder
from nextgpt.world.imagebind import WorldImageBindSettings, train_world_imagebind
from nextgpt.world.llm import WorldLLMSettings, build_world_llm

log = logging.getLogger(__name__)

WORLD_BUILD_VERSION = "4"  # bump when what is built changes: cached builds of another version are rebuilt
MARKER = ".complete"


# modality -> (folder, pipeline class) of the decoders trained on the world
DECODERS = {
    "image": ("sd", "StableDiffusionPipeline"),
    "audio": ("audioldm", "AudioLDMPipeline"),
    "video": ("t2v", "TextToVideoSDPipeline"),
}


@dataclasses.dataclass(frozen=True)
class WorldSettings:
    imagebind: WorldImageBindSettings = dataclasses.field(default_factory=WorldImageBindSettings)
    decoders: WorldDecodersSettings = dataclasses.field(default_factory=WorldDecodersSettings)
    llm: WorldLLMSettings = dataclasses.field(default_factory=WorldLLMSettings)

    @classmethod
    def small(cls) -> WorldSettings:
        return cls(WorldImageBindSettings.small(), WorldDecodersSettings.small(), WorldLLMSettings.small())


def _marker(settings: WorldSettings) -> str:
    return json.dumps(
        {
            "version": WORLD_BUILD_VERSION,
            "imagebind_layout": imagebind_layout_hash(),
            **dataclasses.asdict(settings),
        },
        sort_keys=True,
    )


def is_complete(out: Path, settings: WorldSettings) -> bool:
    try:
        return (Path(out) / MARKER).read_text() == _marker(settings)
    except OSError:
        return False


def imagebind_path(out: str | Path) -> Path:
    return Path(out) / "imagebind" / IMAGEBIND_FILE


def build_world(
    out: str | Path,
    backbones: str | Path = ".cache/tiny_backbones",
    *,
    small: bool = False,
    force: bool = False,
) -> Path:
    """Train the world backbones into ``out`` (the decoders starting from the tiny ones in ``backbones``,
    built there first when missing) unless a build of these settings is there; returns ``out``."""
    import diffusers  # deferred: diffusers costs ~2 s to import; a finished build needs none

    out = Path(out).absolute()
    settings = WorldSettings.small() if small else WorldSettings()
    if not force and is_complete(out, settings):
        return out
    tiny = build_all(Path(backbones))
    with exclusive(out):
        if not force and is_complete(out, settings):  # built by another process meanwhile
            return out
        start = time.perf_counter()
        with building(out) as tmp:
            torch.manual_seed(settings.imagebind.seed)
            model = ImageBindModel(tiny_imagebind_config())
            report: dict[str, Any] = {
                "imagebind": train_world_imagebind(model, settings.imagebind, work=out.parent)
            }
            imagebind_path(tmp).parent.mkdir(parents=True)
            torch.save(model.state_dict(), imagebind_path(tmp))
            report["llm"] = build_world_llm(tiny["llm"], tmp / "llm", settings.llm)
            for modality, (folder, cls) in DECODERS.items():
                pipe = getattr(diffusers, cls).from_pretrained(tiny[folder])
                report[folder] = train_world_decoder(
                    pipe, modality, settings.decoders.of(modality), work=out.parent
                )
                pipe.save_pretrained(tmp / folder)
            report["seconds"] = round(time.perf_counter() - start, 1)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            (tmp / MARKER).write_text(_marker(settings))
            install(tmp, out, complete=lambda d: is_complete(d, settings), force=force)
        log.info("world backbones built in %.0f s into %s", time.perf_counter() - start, out)
    return out


def prepare(tiny: str | Path, world: str | Path | None = None, small: bool = False) -> None:
    """``model.backbones`` of the tiny and world models: build, when missing, the tiny backbones into
    ``tiny`` (``paths.backbones``) and, given ``world`` (``paths.world_backbones``), the ones trained
    on the toy world from them (``small``: the short build the tests use). Several processes may
    call it at once: one builds, the others wait for it (:mod:`nextgpt.atomic`)."""
    build_all(Path(tiny))
    if world is not None:
        build_world(Path(world), Path(tiny), small=small)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextgpt.world.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".cache/world_backbones"))
    p.add_argument(
        "--backbones",
        type=Path,
        default=Path(".cache/tiny_backbones"),
        help="the tiny backbones the decoders start from",
    )
    p.add_argument("--small", action="store_true", help="the small build the tests use")
    p.add_argument("--force", action="store_true", help="build again even when a complete build is there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = build_world(args.out, args.backbones, small=args.small, force=args.force)
    print(json.dumps(json.loads((out / "report.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
