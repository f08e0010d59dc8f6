from segpipe.cli.main import main

main()
