from nodulekit.cli import main

main()
