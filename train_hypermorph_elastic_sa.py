"""Train the spatially adaptive HyperMorph model with the elastic regularizer (a preset of the shared trainer).

Run `python train_hypermorph_elastic_sa.py --help` for every option.
"""
from hypermorph_spatially_adaptive.cli import cli_main
from hypermorph_spatially_adaptive.trainer import main as _train


def main(argv=None) -> str:
    """Train this preset with the command-line options ``argv``; returns the run folder."""
    return _train("elastic_sa", argv)


if __name__ == "__main__":
    cli_main(main)
