from deit_fast.cli import main

main()
