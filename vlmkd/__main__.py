from vlmkd.cli import main

main()
