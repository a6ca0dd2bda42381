from services.chat.server import main

main()
