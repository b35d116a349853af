"""Train the global HyperMorph model with the diffusion regularizer (a preset of the shared trainer).

Run `python train_hypermorph_diffusion_global.py --help` for every option.
"""
from hypermorph_spatially_adaptive.cli import cli_main
from hypermorph_spatially_adaptive.trainer import main as _train


def main(argv=None) -> str:
    """Train this preset with the command-line options ``argv``; returns the run folder."""
    return _train("diffusion_global", argv)


if __name__ == "__main__":
    cli_main(main)
