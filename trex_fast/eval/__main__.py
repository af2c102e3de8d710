from trex_fast.eval.cli import main

main()
