from ztfd.cli import main

main()
