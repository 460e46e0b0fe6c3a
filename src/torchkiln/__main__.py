from torchkiln.cli import run

run()
