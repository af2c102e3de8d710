from trex_fast.sweep.cli import main_cli

main_cli()
