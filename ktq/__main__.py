from ktq.cli import main

main()
